"""Builds the package, its gRPC stubs generated from the repository's proto/ into the build.

The stubs are not committed: they are derived from ../../proto/cachegw/v1/cache.proto, and a
checked-in copy could drift from the contract (README.md, "Stubs"). Building must not write into
the checkout, so they are generated into the build directory (`build_py`), and setuptools' own
scratch directories (`build/`, `*.egg-info`) go to a temporary directory rather than next to
this file. An editable install is the one exception: its package directory is the checkout's
src/, so the stubs are generated there (git-ignored).
"""

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

# Importing generate_stubs must not leave a __pycache__/ beside it.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_stubs  # noqa: E402


class BuildPyWithStubs(build_py):
    """Copies the package as usual, then generates `cachegw.v1` beside it."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            generate_stubs.generate(generate_stubs.SRC)
        else:
            generate_stubs.generate(Path(self.build_lib))


class SdistWithStubs(sdist):
    """An sdist is built without proto/ beside it, so it carries the stubs made with it."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        generate_stubs.generate(Path(base_dir) / "src")


scratch = tempfile.mkdtemp(prefix="cachegw-py-build-")
atexit.register(shutil.rmtree, scratch, ignore_errors=True)
setup(
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithStubs},
    options={
        "build": {"build_base": str(Path(scratch) / "build")},
        "egg_info": {"egg_base": scratch},
    },
)
