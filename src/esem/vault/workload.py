"""One measured run of the vault: N concurrent clients, M files each, then a full check.

``run_workload(backend, attack, clients=, files=, size=, esem_socket=)`` is the unit of
``esem demo`` and of the application benchmark. It makes a vault in a temporary
directory, starts a real server process on it (``esem vault serve --port 0 --sync
BACKEND``, TLS on 127.0.0.1), and, for an attack, the adversary process of
``esem.vault.attacks``, armed before any client starts. Then:

1. the timed phase: every client (a thread with its own TLS connection and login) puts
   its ``files`` files of ``size`` random bytes, then reads each one back;
2. the adversary is stopped; one fresh client lists the vault and reads every file
   whose put succeeded, comparing byte for byte: a file is intact, lost (not in the
   tree) or corrupt (fails authentication, or other bytes);
3. the server is stopped (SIGTERM) and its engine statistics collected.

A request refused with ``NoSlot`` is a slot failure; a put refused so was not written.
``requests_per_s`` is every request of the timed phase over its wall time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esem.paths import socket_path
from esem.vault.attacks import ATTACKS as ATTACK_NAMES
from esem.vault.attacks import Adversary, Evidence
from esem.vault.client import VaultClient
from esem.vault.errors import Corrupt, NoSlot, NotFound, VaultError
from esem.vault.limits import ENGINE_SLOTS, MAX_UPLOAD_BYTES
from esem.vault.server import ENDPOINT_NAME, STATS_NAME, read_endpoint
from esem.vault.sync import SYNCS
from esem.vault.users import add_user

BACKENDS = SYNCS
ATTACKS = ("none", *ATTACK_NAMES)
DEFAULT_CLIENTS = 8  # more than ENGINE_SLOTS, so that sem_service really has to hold some
DEFAULT_FILES = 12
DEFAULT_SIZE = 4096  # bytes per file
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 30.0
USER = "demo"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Row:
    backend: str
    attack: str
    files_written: int  # puts that succeeded
    files_intact: int  # of those, read back byte for byte at the end
    files_lost_or_corrupt: int  # files_written - files_intact
    slot_failures: int  # requests refused by the engine ("no slot")
    requests_per_s: float  # requests of the timed phase / its wall time
    clients: int = 0
    files_per_client: int = 0
    size: int = 0
    files_lost: int = 0  # gone from the tree
    files_corrupt: int = 0  # in the tree, but failing authentication or other bytes
    other_failures: dict[str, int] = field(default_factory=dict)  # error code -> requests
    requests: int = 0
    seconds: float = 0.0
    service_peak: int = 0  # the most threads sem_service let into the engine at once
    filetree_peak: int = 0  # the most threads sem_filetree let into the tree at once
    evidence: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _ClientResult:
    written: list[str] = field(default_factory=list)
    requests: int = 0
    slot_failures: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    error: BaseException | None = None


def _quiet(_: str) -> None:
    pass


def run_workload(backend: str, attack: str = "none", *, clients: int = DEFAULT_CLIENTS,
                 files: int = DEFAULT_FILES, size: int = DEFAULT_SIZE,
                 esem_socket: str | os.PathLike[str] | None = None,
                 progress: Progress | None = None) -> Row:
    """Run the workload on a fresh vault under ``backend`` ('legacy' or 'esem') and
    ``attack`` ('none', 'filetree-race', 'service-blocking'); see the module docstring.

    ``esem_socket``: the esem service for ``backend='esem'`` (default: $ESEM_SOCKET or
    the default location); it must be running. ``progress`` receives one-line status
    messages (the demo prints them on stderr)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, not {attack!r}")
    for label, value, low in (("clients", clients, 1), ("files", files, 1), ("size", size, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, not {value!r}")
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"size {size} exceeds the vault's limit of {MAX_UPLOAD_BYTES} bytes")
    say = progress or _quiet
    env = dict(os.environ)
    if backend == "esem":
        env["ESEM_SOCKET"] = str(socket_path(esem_socket))

    with tempfile.TemporaryDirectory(prefix="esem-vault-") as tmp:
        vdir = Path(tmp) / "vault"
        vdir.mkdir(mode=0o700)
        password = secrets.token_urlsafe(18)
        add_user(vdir, USER, password)
        server = _ServerProcess(vdir, backend, env, Path(tmp) / "server.log")
        server.start()
        stats: dict[str, Any] = {}
        try:
            say(f"vault server up (pid {server.pid}, sync={backend})")
            adversary = Adversary(vdir, attack, env) if attack != "none" else None
            if adversary is not None:
                adversary.start()
                say(f"adversary armed ({attack})")
            try:
                contents = {f"client{c:02d}/file{j:03d}": os.urandom(size)
                            for c in range(clients) for j in range(files)}
                results, seconds = _timed_phase(vdir, password, clients, files, contents)
            finally:
                evidence = adversary.stop() if adversary is not None else None
            say(f"{clients} clients x {files} files done in {seconds:.2f}s; verifying")
            written = [name for r in results for name in r.written]
            lost, corrupt = _verify(vdir, password, written, contents)
        finally:
            stats = server.stop()

    requests = sum(r.requests for r in results)
    failures: Counter[str] = Counter()
    for r in results:
        failures.update(r.failures)
    slots = sum(r.slot_failures for r in results)
    peaks = stats.get("peak_inside", {})
    service_peak = int(peaks.get("sem_service", 0))
    filetree_peak = int(peaks.get("sem_filetree", 0))
    return Row(
        backend=backend, attack=attack, files_written=len(written),
        files_intact=len(written) - lost - corrupt, files_lost_or_corrupt=lost + corrupt,
        slot_failures=slots, requests_per_s=round(requests / seconds, 1) if seconds else 0.0,
        clients=clients, files_per_client=files, size=size, files_lost=lost,
        files_corrupt=corrupt, other_failures=dict(failures), requests=requests,
        seconds=round(seconds, 3), service_peak=service_peak, filetree_peak=filetree_peak,
        evidence=_evidence(evidence, service_peak, filetree_peak))


def _evidence(ev: Evidence | None, service_peak: int, filetree_peak: int) -> str:
    seen = (f"vault: sem_service let up to {service_peak} threads at once into the "
            f"{ENGINE_SLOTS}-slot engine, sem_filetree up to {filetree_peak} into the tree")
    if ev is None:
        return f"no adversary; {seen}"
    return f"adversary {ev.describe()}; {seen}"


def _timed_phase(vdir: Path, password: str, clients: int, files: int,
                 contents: dict[str, bytes]) -> tuple[list[_ClientResult], float]:
    results = [_ClientResult() for _ in range(clients)]
    # Everyone connects and logs in (scrypt) first; the clock starts when all are ready.
    ready = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        res = results[index]
        names = [f"client{index:02d}/file{j:03d}" for j in range(files)]
        vc: VaultClient | None = None
        try:
            vc = VaultClient.for_directory(vdir, USER, password)
            vc.connect()
        except BaseException as exc:
            res.error = exc
            ready.abort()
            if vc is not None:
                vc.close()
            return
        try:
            ready.wait()
            for name in names:
                res.requests += 1
                try:
                    vc.put(name, contents[name])
                    res.written.append(name)
                except NoSlot:
                    res.slot_failures += 1
                except VaultError as exc:
                    res.failures[str(exc.code)] += 1
            for name in res.written:
                res.requests += 1
                try:
                    vc.get(name)  # compared in _verify; here it is load, as a user reads
                except NoSlot:
                    res.slot_failures += 1
                except VaultError as exc:
                    res.failures[str(exc.code)] += 1
        except BaseException as exc:
            res.error = exc
        finally:
            vc.close()

    threads = [threading.Thread(target=client, args=(i,), name=f"vault-client-{i}")
               for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: see below
        ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    errors = [r.error for r in results if r.error is not None]
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))  # the cause first
    if errors:
        raise RuntimeError(f"a vault client failed: {errors[0]!r}") from errors[0]
    return results, seconds


def _verify(vdir: Path, password: str, written: list[str],
            contents: dict[str, bytes]) -> tuple[int, int]:
    """(lost, corrupt) among ``written``, read back through one fresh connection (one
    request at a time: the check itself never needs more than one engine slot)."""
    lost = corrupt = 0
    with VaultClient.for_directory(vdir, USER, password) as vc:
        listed = {f.name for f in vc.ls()}
        for name in written:
            if name not in listed:
                lost += 1
                continue
            try:
                data = vc.get(name)
            except NotFound:
                lost += 1
                continue
            except Corrupt:
                corrupt += 1
                continue
            if data != contents[name]:
                corrupt += 1
    return lost, corrupt


class _ServerProcess:
    """``esem vault serve`` in a child process, ready once its endpoint.json names it."""

    def __init__(self, vdir: Path, backend: str, env: dict[str, str], log: Path) -> None:
        self.vdir = vdir
        self.backend = backend
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self) -> None:
        args = [sys.executable, "-m", "esem", "vault", "serve", "--dir", str(self.vdir),
                "--port", "0", "--sync", self.backend, "--quiet"]
        if self.backend == "esem":
            args += ["--socket", self.env["ESEM_SOCKET"]]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=self.env)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vault server exited with {self.proc.returncode}: "
                                   f"{self._log_tail()}")
            if (self.vdir / ENDPOINT_NAME).exists():
                try:
                    if read_endpoint(self.vdir).get("pid") == self.proc.pid:
                        return
                except (ValueError, VaultError):
                    pass  # being written, or gone again: look once more
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the vault server did not start within {SERVER_START_TIMEOUT_S}s: "
                           f"{self._log_tail()}")

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"the vault server did not stop: {self._log_tail()}"
                                   ) from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"the vault server exited with {self.proc.returncode}: "
                               f"{self._log_tail()}")
        try:
            stats: dict[str, Any] = json.loads((self.vdir / STATS_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return stats

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"
