"""Installing the package as the README says must not write into the checkout: the stubs are
generated into the build, and setuptools' scratch directories are kept out of the tree. The
installed package must still carry the stubs and import."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root` (ignored ones included): size, mtime and SHA-256 by path."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            files[str(path.relative_to(root))] = (
                stat.st_size,
                stat.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return files


def test_pip_install_leaves_the_checkout_untouched(tmp_path: Path) -> None:
    before = tree(PACKAGE_ROOT)
    target = tmp_path / "site"
    # --no-build-isolation: the build uses this environment's setuptools and grpcio-tools
    # (requirements-test.txt) instead of fetching them.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "--target", str(target), str(PACKAGE_ROOT)],
        check=True,
        cwd=tmp_path,
    )
    after = tree(PACKAGE_ROOT)
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(path for path in set(before) & set(after) if before[path] != after[path])
    assert (created, removed, changed) == ([], [], []), (
        f"the build wrote into {PACKAGE_ROOT}: created {created}, removed {removed}, "
        f"changed {changed}"
    )

    imported = subprocess.run(
        [sys.executable, "-c",
         "import cachegw, cachegw.v1.cache_pb2_grpc as grpc_stubs; "
         "print(cachegw.__file__); print(grpc_stubs.CacheStub.__name__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    module_file, stub = imported.stdout.split()
    assert Path(module_file).is_relative_to(target), module_file
    assert stub == "CacheStub"
