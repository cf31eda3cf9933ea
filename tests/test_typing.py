"""What users' type checkers see of esem: the package is marked typed (PEP 561
``py.typed``), and ``sem_open`` is typed by its flags.

The check runs mypy, as a user would, over a small program against a copy of the package
installed the way a wheel installs it (its modules plus the package data pyproject.toml
declares) into the site-packages of a bare virtual environment.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "esem"

PROGRAM = """\
import esem
import esem.posix_ipc

def use(flags: int) -> None:
    reveal_type(esem.sem_open("/x", esem.O_CREAT, 0o600, 1, flags=esem.USE_ESEM))
    reveal_type(esem.sem_open("/x", esem.O_CREAT, 0o600, 1))
    reveal_type(esem.sem_open("/x", flags=flags))
    handle: esem.EsemSemaphore = esem.sem_open("/x", flags=esem.USE_ESEM, key=b"k" * 16)
    wrong: esem.EsemSemaphore = esem.sem_open("/x")
    reveal_type(esem.posix_ipc.Semaphore("/x").value)
    esem.posix_ipc.SharedMemory("/x", esem.posix_ipc.O_CREX, size=4096).close_fd()
    esem.posix_ipc.unlink_shared_memory("/x")
"""


def _install(target: Path, package_data: list[str]) -> None:
    """Copy the package as a wheel would: every module, and the declared data files."""
    for path in SRC.rglob("*"):
        rel = path.relative_to(SRC)
        if "__pycache__" in rel.parts or path.is_dir():
            continue
        if path.suffix == ".py" or any(rel.match(p) for p in package_data):
            dest = target / "esem" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)


def _mypy(tmp_path: Path, package_data: list[str]) -> str:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    _install(Path(purelib), package_data)
    (tmp_path / "prog.py").write_text(PROGRAM)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-executable",
         str(python), "--cache-dir", str(tmp_path / "cache"), "prog.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return out.stdout + out.stderr


def _declared_package_data() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data: list[str] = config["tool"]["setuptools"]["package-data"]["esem"]
    return data


def test_py_typed_is_shipped_as_package_data() -> None:
    assert (SRC / "py.typed").is_file()
    assert "py.typed" in _declared_package_data()


@pytest.mark.timeout(300)
def test_users_type_checker_sees_sem_open_typed_by_its_flags(tmp_path: Path) -> None:
    out = _mypy(tmp_path, _declared_package_data())
    revealed = re.findall(r'Revealed type is "([^"]+)"', out)
    assert revealed == [
        "esem.api.EsemSemaphore",
        "esem.legacy.LegacySemaphore",
        "esem.api.EsemSemaphore | esem.legacy.LegacySemaphore",
        "int",
    ], out
    # the one wrong assignment, and nothing else (posix_ipc's re-exported names are
    # seen), is an error
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "prog.py:9:" in errors[0], out
    assert "LegacySemaphore" in errors[0]


@pytest.mark.timeout(300)
def test_without_py_typed_the_checker_sees_nothing(tmp_path: Path) -> None:
    """The marker is what makes the difference (the test above would pass vacuously if
    mypy read the package anyway)."""
    out = _mypy(tmp_path, [])
    assert "missing library stubs or py.typed marker" in out, out
