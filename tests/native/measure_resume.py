"""Measure how long a service restart costs the native client's blocked callers (issue 14):
K unmodified C programs under ``esem run --all`` block in ``sem_wait``; the service is
SIGKILLed and restarted on its state directory; K posts are made as soon as it has
published its key again. Prints the restart time (kill to key published) and the time
from then until every program's ``sem_wait`` has returned 0 (reconnect backoff, RESUME,
the posts' round trips). Not a test: a measurement to run by hand after building the
workspace (``cargo build --workspace --all-targets`` in ``native/``)::

    .venv/bin/python tests/native/measure_resume.py 1 10 50
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from esem.server.embedded import EmbeddedService

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "native" / "target" / "debug"


def client_env(svc: EmbeddedService) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ESEM_PUBKEY"}
    env.update(ESEM_SOCKET=str(svc.socket_path),
               ESEM_PRELOAD_LIB=str(DEBUG / "libesem_preload.so"))
    return env


def waiters(svc: EmbeddedService, name: str) -> int | None:
    r = subprocess.run([sys.executable, "-m", "esem", "stat", "--json", name],
                       capture_output=True, text=True, env=client_env(svc))
    return int(json.loads(r.stdout)["waiters"]) if r.returncode == 0 else None


def measure(prog: Path, k: int) -> str:
    svc = EmbeddedService(extra_args=["--resume-grace", "30"])
    svc.start()
    name = f"/measure-resume-{k}-{os.getpid()}"
    procs = [subprocess.Popen([sys.executable, "-m", "esem", "run", "--all", "--", str(prog),
                               "wait", name], stdout=subprocess.PIPE, text=True,
                              env=client_env(svc), start_new_session=True)
             for _ in range(k)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "waiting"
        while waiters(svc, name) != k:
            time.sleep(0.05)
        assert svc.proc is not None
        os.kill(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait()
        killed = time.monotonic()
        svc.start()
        up = time.monotonic()
        poster = subprocess.Popen([str(DEBUG / "examples" / "esemc")], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True, env=client_env(svc))
        assert poster.stdin is not None
        poster.stdin.write(f"open {name} - 0 600\n" + "post\n" * k)
        poster.stdin.close()
        left = {p.stdout.fileno(): p for p in procs if p.stdout is not None}
        while left:
            ready, _, _ = select.select(list(left), [], [], 60)
            assert ready, "a program hung"
            for fd in ready:
                out = left.pop(fd).stdout
                assert out is not None and out.readline().strip() == "granted"
        done = time.monotonic()
        poster.wait()
        return (f"{k} blocked programs: restart {up - killed:.2f} s (SIGKILL to key "
                f"published), then {1000 * (done - up):.0f} ms until every sem_wait returned")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        svc.cleanup()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="esem-measure-") as d:
        prog = Path(d) / "resume"
        subprocess.run(["gcc", "-O1", str(Path(__file__).parent / "c" / "resume.c"), "-o",
                        str(prog)], check=True)
        for k in [int(a) for a in sys.argv[1:]] or [1, 10, 50]:
            print(measure(prog, k), flush=True)


if __name__ == "__main__":
    main()
