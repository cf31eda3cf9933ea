"""``esem run`` and ``esem preload``: a program run under the preload library keeps its
semaphores in the service; static executables are refused with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esem.native import is_static_elf
from esem.server.embedded import EmbeddedService


def esem(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esem", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_preload_prints_the_library(preload: Path) -> None:
    r = esem("preload", env={"ESEM_PRELOAD_LIB": str(preload)})
    assert r.returncode == 0 and Path(r.stdout.strip()) == preload.resolve()
    info = json.loads(esem("preload", "--json", env={"ESEM_PRELOAD_LIB": str(preload)}).stdout)
    assert Path(info["library"]) == preload.resolve() and info["header"].endswith("esem.h")


def test_run_moves_the_programs_semaphores(preload: Path, semtest: Path,
                                           service: EmbeddedService, sem_name: str) -> None:
    env = {"ESEM_PRELOAD_LIB": str(preload)}
    r = esem("run", "--", str(semtest), "ops", sem_name, env=env)
    assert r.returncode == 0 and "ops ok" in r.stdout, r.stderr
    r = esem("run", "--all", "--", str(semtest), "unnamed", env=env)
    assert r.returncode == 0 and "unnamed ok" in r.stdout, r.stderr
    # Without --all an unnamed semaphore stays glibc's, and works as such.
    r = esem("run", "--", str(semtest), "legacy", sem_name + "-l", env=env)
    assert r.returncode == 0 and "legacy ok" in r.stdout, r.stderr


def test_run_returns_the_programs_status(preload: Path) -> None:
    r = esem("run", "--", "false", env={"ESEM_PRELOAD_LIB": str(preload)})
    assert r.returncode == 1
    r = esem("run", env={"ESEM_PRELOAD_LIB": str(preload)})
    assert r.returncode == 2 and "no command" in r.stderr
    r = esem("run", "--", "/no/such/program", env={"ESEM_PRELOAD_LIB": str(preload)})
    assert r.returncode == 2 and "not found" in r.stderr


def test_run_refuses_static_binaries(preload: Path, tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "s.c"
    src.write_text("int main(void) { return 0; }\n")
    static, dynamic = tmp_path / "static", tmp_path / "dynamic"
    subprocess.run([gcc, str(src), "-o", str(dynamic)], check=True)
    built = subprocess.run([gcc, "-static", str(src), "-o", str(static)], capture_output=True)
    if built.returncode != 0:
        pytest.skip("no static libc to link a static test program")
    assert is_static_elf(static) and not is_static_elf(dynamic)
    r = esem("run", "--", str(static), env={"ESEM_PRELOAD_LIB": str(preload)})
    assert r.returncode == 2 and "statically linked" in r.stderr
    r = esem("run", "--", str(dynamic), env={"ESEM_PRELOAD_LIB": str(preload)})
    assert r.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_run_refuses_setuid_binaries(preload: Path, tmp_path: Path) -> None:
    """The loader ignores LD_PRELOAD for a program that changes credentials at exec: esem
    run says so instead of starting it with its semaphores left in glibc."""
    os.chmod(tmp_path, 0o755)
    prog = tmp_path / "setuid-true"
    shutil.copyfile(shutil.which("true") or "/bin/true", prog)
    os.chown(prog, 65534, 65534)
    env = {"ESEM_PRELOAD_LIB": str(preload)}
    for mode, what in ((0o4755, "setuid to uid 65534"), (0o2755, "setgid to gid 65534")):
        os.chmod(prog, mode)
        r = esem("run", "--", str(prog), env=env)
        assert r.returncode == 2 and what in r.stderr and "LD_PRELOAD" in r.stderr, r.stderr
    os.chmod(prog, 0o755)  # the same file without the bits runs
    assert esem("run", "--", str(prog), env=env).returncode == 0
    os.chown(prog, os.getuid(), os.getgid())  # setuid to oneself changes nothing: runs
    os.chmod(prog, 0o4755)
    assert esem("run", "--", str(prog), env=env).returncode == 0


def test_preload_finds_a_built_library_without_the_variable(native_build: Path) -> None:
    """Installed (pip builds it into esem/_native) or the repository's Cargo build."""
    env = {k: v for k, v in os.environ.items() if k != "ESEM_PRELOAD_LIB"}
    r = subprocess.run([sys.executable, "-m", "esem", "preload"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    lib = Path(r.stdout.strip())
    assert lib.is_file() and lib.name.startswith("libesem_preload")


MP_PROGRAM = """
import multiprocessing as mp
def work(lock, counter, n):
    for _ in range(n):
        with lock:
            counter.value += 1
if __name__ == "__main__":
    mp.set_start_method("fork")
    lock = mp.Lock()
    counter = mp.Value("i", 0, lock=False)
    ps = [mp.Process(target=work, args=(lock, counter, 200)) for _ in range(4)]
    [p.start() for p in ps]
    [p.join() for p in ps]
    print("counter", counter.value, [p.exitcode for p in ps])
"""


def test_run_all_python_multiprocessing(preload: Path, service: EmbeddedService,
                                        tmp_path: Path) -> None:
    """An unmodified real program under --all: CPython's own thread locks (unnamed POSIX
    semaphores) and multiprocessing's named Lock, shared by four fork children, all in
    the service; mutual exclusion holds. Without a service the interpreter cannot even
    start, which shows the semaphores really were e-semaphores."""
    script = tmp_path / "mp.py"
    script.write_text(MP_PROGRAM)
    env = {"ESEM_PRELOAD_LIB": str(preload)}
    r = esem("run", "--all", "--", sys.executable, str(script), env=env)
    assert r.returncode == 0, r.stderr
    assert "counter 800 [0, 0, 0, 0]" in r.stdout
    env |= {"ESEM_SOCKET": str(tmp_path / "none.sock"), "ESEM_PUBKEY": "11" * 32}
    r = esem("run", "--all", "--", sys.executable, str(script), env=env)
    assert r.returncode != 0 and "sem_init" in r.stderr
