"""Generates `cachegw.v1.cache_pb2` and `cachegw.v1.cache_pb2_grpc` from the repository's proto/.

protoc names a generated module after its proto path: `cachegw/v1/cache.proto` becomes
`cachegw/v1/cache_pb2.py`, and the `_grpc` module imports it as `from cachegw.v1 import
cache_pb2`. Generating into the root the package is built in (a wheel's build directory) makes
that path a subpackage of this package (`cachegw.v1`), so the generated imports work unchanged and
the descriptors keep the same file names as the Rust side's.

setup.py runs it on every build, into the build directory (into src/ only for an editable
install). By hand: `python generate_stubs.py [ROOT]` (default: src/, git-ignored).
"""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTOS = ["cachegw/v1/cache.proto"]
SRC = HERE / "src"


def generate(root: Path = SRC) -> None:
    """Writes the `cachegw/v1/` package of stubs under `root`."""
    package = root / "cachegw" / "v1"
    if not (PROTO_ROOT / PROTOS[0]).is_file():
        shipped = SRC / "cachegw" / "v1"
        if not (shipped / "cache_pb2.py").is_file():
            raise SystemExit(
                f"generate_stubs: {PROTO_ROOT / PROTOS[0]} not found (build from a clone)"
            )
        # An sdist: the stubs were generated when it was made.
        if shipped.resolve() != package.resolve():
            shutil.copytree(shipped, package, dirs_exist_ok=True)
        return
    from grpc_tools import protoc  # a build-time dependency only

    package.mkdir(parents=True, exist_ok=True)
    # Replaced, not rewritten: a file here may be a hard link to one elsewhere (an sdist's
    # release tree links the checkout's files), and that one must not change.
    for stale in package.glob("cache_pb2*"):
        stale.unlink()
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            *(str(PROTO_ROOT / proto) for proto in PROTOS),
        ]
    )
    if status != 0:
        raise SystemExit(f"generate_stubs: protoc failed with status {status}")
    init = package / "__init__.py"
    init.unlink(missing_ok=True)
    init.write_text('"""Generated from proto/cachegw/v1 by generate_stubs.py: do not edit."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC)
