"""Fixtures for the native (Rust) code: build the Cargo workspace once per session and
drive its interop tool over a pipe.

The build runs ``cargo`` directly (``native/``); a machine without cargo skips these
tests with a message saying so (this project's machines and CI have it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKSPACE = ROOT / "native"
TARGET = WORKSPACE / "target" / "debug"
HERE = Path(__file__).resolve().parent
INCLUDE = WORKSPACE / "include"


_built: list[subprocess.CompletedProcess[str]] = []


def _build() -> subprocess.CompletedProcess[str] | None:
    """Build every crate, test, binary and example of the workspace (debug), once."""
    cargo = shutil.which("cargo")
    if cargo is None:
        return None
    if not _built:
        _built.append(subprocess.run(
            [cargo, "build", "--quiet", "--workspace", "--all-targets",
             "--features", "esem-proto/deterministic"],
            cwd=WORKSPACE, capture_output=True, text=True,
        ))
    return _built[0]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build before the first test runs, so that a clean build (about two minutes on a
    loaded machine) is not charged to one test's timeout."""
    if any(HERE in Path(item.path).parents for item in session.items):
        _build()


@pytest.fixture(scope="session")
def native_build() -> Path:
    """The target directory of the built workspace."""
    result = _build()
    if result is None:
        pytest.skip("cargo is not installed: the native client cannot be built here")
    assert result.returncode == 0, f"cargo build failed:\n{result.stderr}"
    return TARGET


class Interop:
    """The ``interop`` example: one JSON command per line, one JSON answer per line."""

    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "interop tool exited"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ok(self, **cmd: Any) -> dict[str, Any]:
        answer = self.call(**cmd)
        assert answer["ok"], answer
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def interop(native_build: Path) -> Iterator[Interop]:
    tool = Interop(native_build / "examples" / "interop")
    yield tool
    tool.close()


@pytest.fixture(scope="session")
def preload(native_build: Path) -> Path:
    lib = native_build / "libesem_preload.so"
    assert lib.exists(), lib
    return lib


def compile_c(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Compile ``tests/native/c/NAME.c`` (warnings as errors, with ``esem.h`` on the
    include path) into a fresh temporary directory; skip the test without a compiler."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler: these tests compile small C programs")
    exe = tmp_path_factory.mktemp("c") / name
    subprocess.run([gcc, "-Wall", "-Wextra", "-Werror", "-O1", "-pthread", "-I", str(INCLUDE),
                    str(HERE / "c" / f"{name}.c"), "-o", str(exe)], check=True)
    return exe


@pytest.fixture(scope="session")
def semtest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "semtest")
