"""Every `# example:` block of README.md runs, as a script, against the real gateway."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Gateway

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = {
    m.group(1): m.group(0)
    for m in re.finditer(r"# example: ([^\n]+)\n.*?(?=^```)", README.read_text(), re.S | re.M)
}


def test_the_readme_has_its_examples():
    assert len(EXAMPLES) == 4, list(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES), ids=lambda n: re.sub(r"\W+", "-", n).strip("-"))
def test_readme_example_runs(name: str, gateway: Gateway, tmp_path: Path):
    script = tmp_path / "example.py"
    script.write_text(EXAMPLES[name])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEGW_")}
    env["CACHEGW_ADDR"] = gateway.addr
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    if name == "@cached on a coroutine function":
        assert "100 callers, 1 call(s) of the function" in run.stdout
