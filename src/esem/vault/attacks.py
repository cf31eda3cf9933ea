"""The vault's two attacks: a same-uid process goes after one of its semaphores.

* ``filetree-race`` targets ``sem_filetree``: with its count raised, several service
  threads run the tree's read-modify-write at once, and files are lost or corrupted.
* ``service-blocking`` targets ``sem_service``: with its count raised, more threads
  than the engine has slots enter it, and requests fail with "no slot".

The adversary is a separate process of the vault's uid, playing two adversaries of the
threat model at once, against whichever backend the vault uses:

* A1 (``esem.attack.critical.tamper_word``): rewrite the count word of the legacy
  semaphore in ``/dev/shm/sem.NAME`` to TAMPER_VALUE, every TAMPER_PERIOD_S. Against
  esem it looks for the file and finds none: the count lives in the service.
* A4-style malware: open the semaphore by its (published, not secret) name through the
  ordinary API, without a key, and post it, up to POST_ATTEMPTS times. Legacy lets any
  process of the uid do that; the vault's e-semaphores are key-bound, so the service
  answers ``KeyRejected`` and nothing changes.

It runs as ``python -m esem.vault.attacks --dir VAULT --attack NAME``: it prints
``armed`` once its first round is done, plays until its stdin closes, then prints its
evidence as one JSON line. ``Adversary`` drives that process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esem.api import USE_ESEM, sem_open
from esem.attack.critical import legacy_sem_path, tamper_word
from esem.errors import EsemError
from esem.vault.server import read_endpoint

ATTACKS = ("filetree-race", "service-blocking")
TARGETS = {"filetree-race": "filetree", "service-blocking": "service"}  # which semaphore
TAMPER_VALUE = 1000  # far above both honest initial values (1 and ENGINE_SLOTS)
TAMPER_PERIOD_S = 0.0005  # between rounds: faster than the vault takes units back
POST_ATTEMPTS = 50  # A4-style posts through the API (each one would add a unit)
ARM_TIMEOUT_S = 20.0  # the adversary process must have played a round by then


@dataclass
class Evidence:
    """What the adversary did and what it got, counted."""

    attack: str
    backend: str
    semaphore: str
    shm_path: str
    rounds: int = 0
    file_found: int = 0  # rounds in which /dev/shm/sem.NAME existed
    rewrites: int = 0  # A1: count words rewritten to TAMPER_VALUE
    post_attempts: int = 0  # A4-style: opened by name without a key, then posted
    posts_ok: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # exception class -> times
    last_refusal: str = ""

    def describe(self) -> str:
        if self.rewrites:
            a1 = f"rewrote {self.shm_path} {self.rewrites} times, to {TAMPER_VALUE} each time"
        elif self.file_found:
            a1 = f"found {self.shm_path} but could not rewrite it"
        else:
            a1 = (f"looked for {self.shm_path} {self.rounds} times: no such file, the count "
                  "is in the esem service")
        refused = ", ".join(f"{n}x {k}" for k, n in sorted(self.refusals.items()))
        a4 = (f"opened {self.semaphore} by name without a key and posted it: "
              f"{self.posts_ok} of {self.post_attempts} posts went through")
        if refused:
            a4 += f", refused {refused} ({self.last_refusal})"
        return f"{a1}; {a4}"


def play(endpoint: dict[str, Any], attack: str, stop: threading.Event,
         on_armed: Callable[[], None] = lambda: None) -> Evidence:
    """Attack the vault described by ``endpoint`` until ``stop`` is set."""
    if attack not in TARGETS:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    name = str(endpoint["semaphores"][TARGETS[attack]])
    backend = str(endpoint["sync"])
    # The malware uses the same API as the vault, with the vault's backend flag: it is
    # denied only the key, which it does not have.
    flags = USE_ESEM if backend == "esem" else 0
    path = legacy_sem_path(name)
    ev = Evidence(attack, backend, name, str(path))
    refusals: Counter[str] = Counter()
    armed = False
    while not stop.is_set():
        ev.rounds += 1
        if path.exists():
            ev.file_found += 1
            with contextlib.suppress(FileNotFoundError):
                tamper_word(path, TAMPER_VALUE)
                ev.rewrites += 1
        if ev.post_attempts < POST_ATTEMPTS:
            ev.post_attempts += 1
            try:
                sem = sem_open(name, flags=flags)
                try:
                    sem.post()
                    ev.posts_ok += 1
                finally:
                    sem.close()
            except EsemError as exc:
                refusals[type(exc).__name__] += 1
                ev.last_refusal = str(exc)
        if not armed:
            on_armed()
            armed = True
        stop.wait(TAMPER_PERIOD_S)
    ev.refusals = dict(refusals)
    return ev


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esem.vault.attacks",
        description="A same-uid adversary against a running vault's semaphores. Prints "
        "'armed' after its first round, attacks until stdin closes, then prints its "
        "evidence as JSON.")
    parser.add_argument("--dir", required=True, help="the vault directory (endpoint.json)")
    parser.add_argument("--attack", required=True, choices=ATTACKS)
    args = parser.parse_args(argv)
    endpoint = read_endpoint(Path(args.dir))
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the driver closed it (or died)
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    ev = play(endpoint, args.attack, stop, on_armed=lambda: print("armed", flush=True))
    print(json.dumps(asdict(ev)), flush=True)
    return 0


class Adversary:
    """Runs the adversary process against the vault in ``directory``."""

    def __init__(self, directory: Path, attack: str, env: dict[str, str] | None = None) -> None:
        if attack not in TARGETS:
            raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
        self.directory = directory
        self.attack = attack
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<Adversary {self.attack} on {self.directory} pid={pid}>"

    def start(self) -> Adversary:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "esem.vault.attacks", "--dir", str(self.directory),
             "--attack", self.attack],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=self.env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + ARM_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if line.strip() != b"armed":
            self._kill()
            raise RuntimeError(f"the {self.attack} adversary did not start: {self._errors()}")
        return self

    def stop(self) -> Evidence:
        proc = self.proc
        assert proc is not None
        try:
            # Closes the child's stdin (its stop signal), then collects its evidence.
            out, _ = proc.communicate(timeout=ARM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()
            raise RuntimeError(f"the {self.attack} adversary did not stop") from None
        try:
            doc = json.loads(out.decode().strip().splitlines()[-1])
            return Evidence(**doc)
        except (ValueError, IndexError, TypeError) as exc:
            raise RuntimeError(f"the {self.attack} adversary reported no evidence ({exc}): "
                               f"{self._errors()}") from None
        finally:
            self._stderr.close()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _errors(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-2000:] or f"exit status {self.proc.returncode if self.proc else None}"

    def __enter__(self) -> Adversary:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._kill()


if __name__ == "__main__":
    raise SystemExit(main())
