"""Every README example marked ``# example: NAME`` runs, as a script of its own, against
the real daemon (a spawn child must import its functions from a file, hence scripts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"```python\n(# example: ([\w-]+)\n.*?)```", re.S)
EXAMPLES = {m.group(2): m.group(1) for m in BLOCK.finditer(README.read_text())}


def test_the_api_section_has_its_examples() -> None:
    assert set(EXAMPLES) == {"asyncio", "anyio", "primitives", "multiprocessing"}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name: str, service: Any, tmp_path: Path) -> None:
    script = tmp_path / f"example_{name}.py"
    script.write_text(EXAMPLES[name])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{name} example ok" in done.stdout
