"""A real esem daemon in a child process: for the demo, the tests and the benchmarks.

It runs ``python -m esem serve`` exactly as an operator would, in a directory of its own,
and waits until the service answers. Nothing is mocked; ``kill()`` is a real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from esem.paths import SOCKET_NAME, pubkey_path


class EmbeddedService:
    def __init__(self, directory: str | os.PathLike[str] | None = None,
                 extra_args: list[str] | None = None, *, switchless: bool = False) -> None:
        """``switchless=True`` starts it with ``--switchless``: sessions may then move
        to shared-memory rings (clients ask with ``ESEM_SWITCHLESS=1`` or
        ``esem.connect(switchless=True)``; ``env()`` does not ask for them)."""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="esem-")
            directory = self._tmp.name
        self.dir = Path(directory)
        self.socket_path = self.dir / SOCKET_NAME
        self.log_path = self.dir / "service.log"
        self.switchless = switchless
        self.extra_args = [*(extra_args or []), *(["--switchless"] if switchless else [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        mode = " switchless" if self.switchless else ""
        return f"<EmbeddedService {self.socket_path} pid={pid}{mode}>"

    @property
    def pubkey(self) -> bytes:
        return bytes.fromhex(pubkey_path(self.socket_path).read_text().strip())

    def env(self) -> dict[str, str]:
        """Environment entries that point clients at this service."""
        return {"ESEM_SOCKET": str(self.socket_path)}

    def start(self, timeout: float = 15.0) -> EmbeddedService:
        self.dir.mkdir(parents=True, exist_ok=True)
        # The service publishes its key only once it listens: that is the readiness
        # signal (a probe connection would hold a session and skew quota tests).
        pubkey_path(self.socket_path).unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "esem", "serve", "--dir", str(self.dir),
                 "--socket", str(self.socket_path), *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"esem service exited with {self.proc.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            if pubkey_path(self.socket_path).exists():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"esem service did not start within {timeout}s")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedService:
        return self.start()

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
