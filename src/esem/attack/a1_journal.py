"""A1 at rest: an adversary who can write the service's journal while it is down.

esem's semaphores survive a restart in the service's journal (PROTOCOL.md 17). Whoever
can write that file (root, a stolen disk, a backup restored) is A1 for it: the same
adversary that rewrites a legacy ``/dev/shm/sem.NAME`` word. Each case here makes a real
journal with a real ``esem serve`` (a semaphore of value 1 with some history, then
SIGKILL), tampers with it, and starts a real service on it:

* ``edit``: one byte of one record flipped;
* ``reorder``: two records swapped (their seq fields rewritten to look in order);
* ``splice``: a record replaced by the record of the same seq from another journal of
  the same service (same key);
* ``cut middle``: one record removed from the middle;
* ``cut tail``: whole records cut off the end (what a crash never does: the head says
  they were committed);
* ``rollback``: both files put back to an older complete copy.

Defended when the service refuses to start (exit 3) and says why. Rollback is the honest
exception: software alone cannot tell an older complete journal from the newest (that
takes a monotonic counter in a TPM or TEE), so its row is a documented limit, reported
as what it is. Legacy beside it: the same adversary edits the ``/dev/shm`` word and the
count changes silently.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from esem.attack.base import Outcome, Target
from esem.attack.critical import legacy_sem_path, tamper_word
from esem.paths import SOCKET_NAME, pubkey_path
from esem.safe_text import printable
from esem.server import journal as jr

NAME = "/a1-journal"
START_WAIT = 15.0  # seconds for a service to start or refuse


def _serve(directory: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "esem", "serve", "--dir", str(directory), "--socket",
         str(directory / SOCKET_NAME), "-q"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _started(proc: subprocess.Popen[bytes], directory: Path) -> bool:
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if pubkey_path(directory / SOCKET_NAME).exists():
            return True
        time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes], *, kill: bool) -> str:
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read() if proc.stdout else b""
    if proc.stdout:
        proc.stdout.close()
    return out.decode(errors="replace")


def _value(directory: Path) -> int:
    """The semaphore's count, asked of the service running in ``directory``."""
    from esem.client.admin import stat_semaphore
    from esem.client.blocking import Client

    client = Client(directory / SOCKET_NAME)
    try:
        return int(stat_semaphore(client, NAME)["value"])
    finally:
        client.close()


def _history(directory: Path, posts: int) -> None:
    """Run a service in ``directory``: the semaphore (value 1), ``posts`` posts, then
    SIGKILL. Its journal records every step."""
    pubkey_path(directory / SOCKET_NAME).unlink(missing_ok=True)
    proc = _serve(directory)
    try:
        if not _started(proc, directory):
            raise RuntimeError(f"esem serve did not start: {_stop(proc, kill=True)[-500:]}")
        env = {**os.environ, "ESEM_SOCKET": str(directory / SOCKET_NAME)}
        env.pop("ESEM_PUBKEY", None)
        script = ("import esem\n"
                  f"s = esem.sem_open({NAME!r}, esem.O_CREAT, 0o600, 1, flags=esem.USE_ESEM)\n"
                  f"for _ in range({posts}): s.post()\n")
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60,
                       stdin=subprocess.DEVNULL, capture_output=True)
    finally:
        _stop(proc, kill=True)
        _leftovers(directory)


def _leftovers(directory: Path) -> None:
    """A killed service leaves its socket and published key behind."""
    for path in (directory / SOCKET_NAME, pubkey_path(directory / SOCKET_NAME)):
        path.unlink(missing_ok=True)


def _records(data: bytes) -> list[tuple[int, int]]:
    pos, out = jr._HEADER.size, []
    while pos + jr._REC.size <= len(data):
        _, _, length = jr._REC.unpack_from(data, pos)
        out.append((pos, pos + jr._REC.size + length))
        pos += jr._REC.size + length
    return out


def _edit(path: Path, other: Path) -> str:
    data = bytearray(path.read_bytes())
    start, end = _records(bytes(data))[2]
    data[(start + end) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return f"flipped one bit of the record at bytes {start}..{end}"


def _reorder(path: Path, other: Path) -> str:
    data = path.read_bytes()
    recs = _records(data)
    (a0, a1), (b0, b1) = recs[2], recs[3]
    swapped = bytearray(data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:])
    for i, (s, _) in enumerate(_records(bytes(swapped))):  # seq fields made to look in order
        first = int.from_bytes(data[jr._HEADER.size - 8 : jr._HEADER.size], "big")
        swapped[s + 1 : s + 9] = (first + i).to_bytes(8, "big")
    path.write_bytes(bytes(swapped))
    return "swapped records 3 and 4 and renumbered them in order"


def _splice(path: Path, other: Path) -> str:
    data, odata = path.read_bytes(), (other / jr.JOURNAL_NAME).read_bytes()
    start, end = _records(data)[3]
    ostart, oend = _records(odata)[3]
    path.write_bytes(data[:start] + odata[ostart:oend] + data[end:])
    return "replaced record 4 by record 4 of another journal of the same service (same key)"


def _cut_middle(path: Path, other: Path) -> str:
    data = path.read_bytes()
    start, end = _records(data)[2]
    path.write_bytes(data[:start] + data[end:])
    return f"removed the record at bytes {start}..{end}"


def _cut_tail(path: Path, other: Path) -> str:
    data = path.read_bytes()
    recs = _records(data)
    start = recs[-3][0]
    path.write_bytes(data[:start])
    return f"cut the last 3 records ({len(data) - start} bytes) off the end"


CASES: list[tuple[str, Callable[[Path, Path], str]]] = [
    ("edit", _edit), ("reorder", _reorder), ("splice", _splice),
    ("cut middle", _cut_middle), ("cut tail", _cut_tail),
]


def _attempt(label: str, directory: Path, what: str) -> Outcome:
    before = (directory / jr.JOURNAL_NAME).read_bytes()
    pubkey_path(directory / SOCKET_NAME).unlink(missing_ok=True)
    proc = _serve(directory)
    up = _started(proc, directory)
    out = _stop(proc, kill=False)
    said = printable(out.strip().splitlines()[-1] if out.strip() else "", limit=300)
    intact = (directory / jr.JOURNAL_NAME).read_bytes() == before
    if not up and proc.returncode == 3 and "cannot be used" in out and intact:
        return Outcome(label, "esem", "defended",
                       f"{what}: the service refused to start (exit 3) and left the journal "
                       f"as it was: {said}")
    return Outcome(label, "esem", "broken",
                   f"{what}: the service {'started' if up else 'exited'} "
                   f"(exit {proc.returncode}): {said}")


def _rollback(base: Path, work: Path) -> Outcome:
    label = "A1 journal rollback"
    directory = work / "rollback"
    shutil.copytree(base, directory)
    older = work / "rollback-older"
    shutil.copytree(directory, older)
    _history(directory, 3)  # three more posts after the copy was taken
    pubkey_path(directory / SOCKET_NAME).unlink(missing_ok=True)
    proc = _serve(directory)
    newer = _value(directory) if _started(proc, directory) else None
    _stop(proc, kill=True)
    _leftovers(directory)
    for name in (jr.JOURNAL_NAME, jr.HEAD_NAME):
        shutil.copy(older / name, directory / name)
    pubkey_path(directory / SOCKET_NAME).unlink(missing_ok=True)
    proc = _serve(directory)
    rolled = _value(directory) if _started(proc, directory) else None
    out = _stop(proc, kill=False)
    what = ("put an older complete copy of the journal and its head back (the state before "
            "the last 3 posts)")
    if rolled is not None and rolled != newer:
        return Outcome(label, "esem", "broken",
                       f"{what}: the service started on it, count {rolled} instead of "
                       f"{newer}: an older complete journal cannot be told from the newest "
                       "in software (that needs a monotonic counter in a TPM or TEE)",
                       documented_limit=True)
    return Outcome(label, "esem", "defended" if rolled is None else "broken",
                   f"{what}: count {rolled} (newest {newer}); "
                   f"{printable(out[-200:], limit=200)}", documented_limit=rolled is not None)


def _legacy() -> Outcome:
    from esem.legacy import LegacySemaphore

    name = f"/esem-a1j-{secrets.token_hex(4)}"
    sem = LegacySemaphore(name, create=True, excl=True, mode=0o600, value=1)
    try:
        before = sem.getvalue()
        tamper_word(legacy_sem_path(name), 5)
        after = sem.getvalue()
    finally:
        sem.unlink()
        sem.close()
    broken = after != before
    return Outcome("A1 journal tamper", "legacy", "broken" if broken else "defended",
                   f"the same adversary wrote 5 into {legacy_sem_path(name)}: the count went "
                   f"from {before} to {after} with nothing to notice it")


def run(target: Target) -> list[Outcome]:
    work = target.workdir / f"a1j-{secrets.token_hex(4)}"
    work.mkdir(mode=0o700, parents=True)
    rows: list[Outcome] = []
    try:
        base = work / "base"
        base.mkdir(mode=0o700)
        _history(base, 4)
        other = work / "other"  # another journal of the same service: the key copied
        other.mkdir(mode=0o700)
        shutil.copy(base / "service.key", other / "service.key")
        _history(other, 6)
        for label, tamper in CASES:
            here = work / label.replace(" ", "-")
            shutil.copytree(base, here)
            what = tamper(here / jr.JOURNAL_NAME, other)
            rows.append(_attempt(f"A1 journal {label}", here, what))
        rows.append(_rollback(base, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.append(_legacy())
    return rows
