"""``esem attack``: run the adversaries and print what legacy loses and esem keeps.

Exit status 0 when every esem row is ``defended`` or ``n/a``; 1 otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from esem.attack.base import Outcome, Target

# id -> module implementing ``run(target: Target) -> list[Outcome]``
ATTACKS: dict[str, str] = {
    "A1": "esem.attack.a1_tamper",
    "A1-JOURNAL": "esem.attack.a1_journal",  # A1 at rest: the service's journal edited
    "A2": "esem.attack.a2_mitm",
    "A2-RING": "esem.attack.a2_ring",  # A2 against switchless sessions' shared rings
    "A3": "esem.attack.a3_rogue",
    "A3-SQUAT": "esem.attack.a3_squat",  # A3 creating the owner's name first (O_CREAT)
    "A3-ROBUST": "esem.attack.a3_robust",  # hand-offs and work queues on robust semaphores
    "A4": "esem.attack.a4_forger",
    "A5": "esem.attack.a5_impersonator",
    "A6": "esem.attack.a6_fuzz",
    "A7": "esem.attack.a7_exhaust",
    "A7-FLOOD": "esem.attack.a7_flood",  # one tenant's admin flood and half-open connections
}


def load(attack_id: str) -> Callable[[Target], list[Outcome]]:
    module = importlib.import_module(ATTACKS[attack_id])
    run: Callable[[Target], list[Outcome]] = module.run
    return run


def esem_rows_hold(rows: list[Outcome]) -> bool:
    """Every esem row is defended or n/a, documented limits aside."""
    return all(r.outcome in ("defended", "n/a") for r in rows
               if r.backend != "legacy" and not r.documented_limit)


def run_attacks(only: list[str] | None = None, sock: str | None = None,
                quick: bool = False) -> list[Outcome]:
    from esem.client import blocking
    from esem.paths import read_pubkey
    from esem.server.embedded import EmbeddedService

    wanted = only or list(ATTACKS)
    for attack_id in wanted:
        if attack_id not in ATTACKS:
            raise ValueError(f"unknown attack {attack_id!r}; choose from {', '.join(ATTACKS)}")
    service = None
    with tempfile.TemporaryDirectory(prefix="esem-attack-") as work:
        os.chmod(work, 0o755)  # adversaries of other uids must reach the service's socket
        if sock is None:
            # --switchless, so that A2-RING has rings to attack; sessions that do not
            # ask for them (every other attack's) are plain socket sessions.
            # A victim whose client failed (IntegrityError) cannot END its session, which
            # then waits detached for its grace period: 1 s keeps A2's checks in SETTLE.
            service = EmbeddedService(Path(work) / "service", switchless=True,
                                      extra_args=["--resume-grace", "1"]).start()
            os.chmod(service.dir, 0o755)
            sock_path = service.socket_path
        else:
            sock_path = Path(sock)
        os.environ["ESEM_SOCKET"] = str(sock_path)
        blocking._process_client = None
        target = Target(sock_path, read_pubkey(sock_path), Path(work), quick)
        rows: list[Outcome] = []
        try:
            for attack_id in wanted:
                print(f"running {attack_id} ...", file=sys.stderr, flush=True)
                rows += load(attack_id)(target)
        finally:
            if service is not None:
                service.cleanup()
    return rows


def print_table(rows: list[Outcome]) -> None:
    from esem.tables import print_table as render

    render(["attack", "backend", "outcome", "evidence"],
           [[r.attack, r.backend, r.outcome,
             ("(documented limit) " if r.documented_limit else "") + r.evidence]
            for r in rows], wrap={3: 90})


def main(only: list[str] | None, sock: str | None, as_json: bool, quick: bool) -> int:
    rows = run_attacks(only, sock, quick)
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print_table(rows)
    return 0 if esem_rows_hold(rows) else 1
