"""Generates the gRPC stubs from the repository's proto/ whenever the package is built.

The stubs are not committed: they are derived from ../../proto/cachegw/v1/cache.proto, and a
checked-in copy could drift from the contract. See README.md, "Stubs". They are generated before
`setup()` runs, not in a build step, because setuptools checks that every listed package
(`cachegw.v1` among them) exists as soon as it reads the configuration.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_stubs  # noqa: E402

generate_stubs.generate()
setup()
