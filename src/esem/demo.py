"""``esem demo``: the FILE VAULT case study, legacy POSIX semaphores beside esem.

An embedded esem service runs in a temporary directory. For each backend (legacy, esem)
and each attack (none, filetree-race, service-blocking), ``esem.vault.workload`` runs a
fresh vault server (TLS on 127.0.0.1, its own process) with N concurrent clients storing
M random files each and reading them back, then verifies every file byte for byte. The
only difference between the two backends in the vault's code is the ``USE_ESEM`` flag
(and the key) at its two ``sem_open`` calls. The harm is measured, not inferred: files
lost or corrupted when the file tree's lock is broken, requests refused by the 5-slot
sealing engine when its gate is.

The critical-section demo that was here before lives on as adversary A1's measuring
stick in ``esem.attack.critical``; its names stay importable from here.
"""

from __future__ import annotations

import json
import os
import sys
import time

from esem.attack.critical import legacy_sem_path, run_case, tamper_word
from esem.tables import print_table
from esem.vault.workload import (
    ATTACKS,
    BACKENDS,
    DEFAULT_CLIENTS,
    DEFAULT_FILES,
    DEFAULT_SIZE,
    Row,
    run_workload,
)

__all__ = ["legacy_sem_path", "run_case", "run_demo", "tamper_word"]

COLUMNS = (  # (header, Row field)
    ("backend", "backend"), ("attack", "attack"), ("written", "files_written"),
    ("intact", "files_intact"), ("lost/corrupt", "files_lost_or_corrupt"),
    ("slot failures", "slot_failures"), ("requests/s", "requests_per_s"),
)


def run_demo(clients: int = DEFAULT_CLIENTS, files: int = DEFAULT_FILES,
             size: int = DEFAULT_SIZE, as_json: bool = False) -> int:
    """Run the six cases and print the table (or JSON); 0 when every esem row kept every
    file and had no slot failure."""
    from esem.client import blocking
    from esem.server.embedded import EmbeddedService

    for label, value, low in (("--clients", clients, 1), ("--files", files, 1),
                              ("--size", size, 0)):
        if value < low:
            raise ValueError(f"{label} must be at least {low}, not {value}")
    rows: list[Row] = []
    started = time.perf_counter()
    with EmbeddedService() as service:
        # Children (the vault servers, the adversaries) inherit this and find the service.
        os.environ.update(service.env())
        blocking._process_client = None
        print(f"esem demo: embedded esem service at {service.socket_path}; "
              f"{clients} clients x {files} files of {size} bytes per case", file=sys.stderr)
        total = len(BACKENDS) * len(ATTACKS)
        for backend in BACKENDS:
            for attack in ATTACKS:
                case = f"[{len(rows) + 1}/{total}] {backend:6} {attack:16}"
                print(f"  {case} running ...", file=sys.stderr, flush=True)

                def progress(msg: str, case: str = case) -> None:
                    print(f"  {case} {msg}", file=sys.stderr, flush=True)

                rows.append(run_workload(backend, attack, clients=clients, files=files,
                                         size=size, esem_socket=service.socket_path,
                                         progress=progress))
    print(f"esem demo: done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        _print_rows(rows)
    esem_ok = all(r.files_lost_or_corrupt == 0 and r.slot_failures == 0
                  and r.files_written == clients * files
                  for r in rows if r.backend == "esem")
    return 0 if esem_ok else 1


def _print_rows(rows: list[Row]) -> None:
    body = [[f"{v:.1f}" if isinstance(v := getattr(r, fld), float) else str(v)
             for _, fld in COLUMNS] for r in rows]
    print_table([h for h, _ in COLUMNS], body, right=range(2, len(COLUMNS)))
    print()
    for r in rows:
        if r.attack != "none":
            print(f"{r.backend} {r.attack}: {r.evidence}")
    print()
    print("The vault's only code difference between the rows is flags=USE_ESEM (and key=) "
          "at its two sem_open calls.\nLegacy counts live in /dev/shm, writable by any "
          "process of the same uid; esem's live only in the service, bound to a key.")
