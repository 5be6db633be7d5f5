"""Generates `cachegw.v1.cache_pb2` and `cachegw.v1.cache_pb2_grpc` from the repository's proto/.

protoc names a generated module after its proto path: `cachegw/v1/cache.proto` becomes
`cachegw/v1/cache_pb2.py`, and the `_grpc` module imports it as `from cachegw.v1 import
cache_pb2`. Generating into `src/` makes that path a subpackage of this package (`cachegw.v1`), so
the generated imports work unchanged and the descriptors keep the same file names as the Rust
side's.

Run by setup.py on every build and by ./run-tests; by hand: `python generate_stubs.py`.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTOS = ["cachegw/v1/cache.proto"]
OUT = HERE / "src"


def generate() -> None:
    from grpc_tools import protoc  # a build-time dependency only

    package = OUT / "cachegw" / "v1"
    if not (PROTO_ROOT / PROTOS[0]).is_file():
        if (package / "cache_pb2.py").is_file():
            return  # an sdist built from a clone: the stubs were generated then
        raise SystemExit(f"generate_stubs: {PROTO_ROOT / PROTOS[0]} not found (build from a clone)")
    package.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            *(str(PROTO_ROOT / proto) for proto in PROTOS),
        ]
    )
    if status != 0:
        raise SystemExit(f"generate_stubs: protoc failed with status {status}")
    (package / "__init__.py").write_text(
        '"""Generated from proto/cachegw/v1 by generate_stubs.py: do not edit."""\n'
    )


if __name__ == "__main__":
    generate()
