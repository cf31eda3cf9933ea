"""One worker process of the crash-torture test (run as a script, never imported by pytest).

Each role uses the public API (``sem_open(..., flags=USE_ESEM)``) exactly as an
application would, through the per-process client, while the test SIGKILLs and
restarts the service under it. A worker never retries or catches an esem error: any
error it sees is written to its result file and fails the test. Roles:

- ``mutex DIR NAME ID``: until ``DIR/stop`` exists, take the value-1 semaphore, then
  inside create ``DIR/inside`` with O_EXCL (a second worker inside at once fails to),
  read-modify-write ``DIR/counter``, remove the marker, post.
- ``producer DIR SLOTS ITEMS``: until ``DIR/stop``, wait for a slot, create the item
  file ``DIR/items/N`` (N counting up), post ``ITEMS``; then write ``DIR/produced``.
- ``consumer DIR SLOTS ITEMS``: wait for an item, move the lowest-numbered item file to
  ``DIR/consumed/`` (a grant without an item, or an item seen twice, is an error), post
  a slot; until every produced item is consumed.
- ``waiter DIR NAME INDEX``: one wait, then append INDEX to ``DIR/order``.
- ``holder DIR ROBUST PLAIN``: take one unit of each, write ``DIR/held``, sleep.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

from esem import USE_ESEM, BusyError, get_client, sem_open


def _result(directory: Path, who: str, **fields: object) -> None:
    tmp = directory / f".result-{who}"
    tmp.write_text(json.dumps(fields))
    tmp.rename(directory / f"result-{who}.json")


def _up(directory: Path, who: str) -> None:
    """Tells the test this worker has done its first operation, and how its session's
    frames travel ("socket" or "switchless") and on which client ("python", "native")."""
    tmp = directory / f".up-{who}"
    client = get_client()
    tmp.write_text(f"{client.mode} {client.transport}")
    tmp.rename(directory / f"up-{who}")  # whole when seen


def mutex(directory: Path, name: str, ident: str) -> dict[str, object]:
    sem = sem_open(name, flags=USE_ESEM)
    stop, marker, counter = directory / "stop", directory / "inside", directory / "counter"
    completed = 0
    violations = 0
    while not stop.exists():
        sem.wait()
        try:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                violations += 1  # another worker is inside: mutual exclusion broken
                continue
            try:
                value = int(counter.read_text())
                if random.random() < 0.3:
                    time.sleep(random.uniform(0, 0.002))  # widen the window
                counter.write_text(str(value + 1))
                completed += 1
                if completed == 1:
                    _up(directory, f"mutex-{ident}")
            finally:
                os.close(fd)
                marker.unlink()
        finally:
            sem.post()
    sem.close()
    return {"completed": completed, "violations": violations}


def producer(directory: Path, slots_name: str, items_name: str) -> dict[str, object]:
    slots = sem_open(slots_name, flags=USE_ESEM)
    items = sem_open(items_name, flags=USE_ESEM)
    spool = directory / "items"
    produced = 0
    while not (directory / "stop").exists():
        slots.wait()
        fd = os.open(spool / f"{produced:08d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        produced += 1
        items.post()
        if produced == 1:
            _up(directory, "producer")
    (directory / "produced").write_text(str(produced))
    return {"produced": produced}


def consumer(directory: Path, slots_name: str, items_name: str) -> dict[str, object]:
    slots = sem_open(slots_name, flags=USE_ESEM)
    items = sem_open(items_name, flags=USE_ESEM)
    spool, done = directory / "items", directory / "consumed"
    consumed: list[int] = []
    errors: list[str] = []
    total: int | None = None
    while total is None or len(consumed) < total:
        try:
            items.timedwait(0.5)
        except BusyError:
            if (directory / "produced").exists():
                total = int((directory / "produced").read_text())
            continue
        names = sorted(os.listdir(spool))
        if not names:
            errors.append(f"granted an item after {len(consumed)} with none produced")
            break
        first = names[0]
        if (done / first).exists():
            errors.append(f"item {first} consumed twice")
        os.rename(spool / first, done / first)
        consumed.append(int(first))
        slots.post()
        if len(consumed) == 1:
            _up(directory, "consumer")
    return {"consumed": consumed, "errors": errors}


def waiter(directory: Path, name: str, index: str) -> dict[str, object]:
    sem = sem_open(name, flags=USE_ESEM)
    (directory / f"ready-{index}").touch()
    sem.wait()
    fd = os.open(directory / "order", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{index}\n".encode())
    finally:
        os.close(fd)
    return {}


def holder(directory: Path, robust_name: str, plain_name: str) -> dict[str, object]:
    robust = sem_open(robust_name, flags=USE_ESEM, robust=True)
    plain = sem_open(plain_name, flags=USE_ESEM)
    robust.wait()
    plain.wait()
    (directory / "held").touch()
    while True:
        time.sleep(60)


ROLES = {"mutex": mutex, "producer": producer, "consumer": consumer, "waiter": waiter,
         "holder": holder}


def main() -> int:
    role, directory, *args = sys.argv[1:]
    where = Path(directory)
    who = f"{role}-{args[-1]}" if role in ("mutex", "waiter") else role
    try:
        fields = ROLES[role](where, *args)
    except BaseException:
        _result(where, who, error=traceback.format_exc())
        return 1
    client = get_client()
    # The transport at the end: a native session that lost its rings to a restart has
    # upgraded again by then (the Python client stays on the socket).
    fields.update(resumes=client.stats.resumes, error=None, mode=client.mode)
    _result(where, who, **fields)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
