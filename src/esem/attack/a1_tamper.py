"""A1, same-uid malware: rewrite the legacy semaphore's count in /dev/shm.

glibc keeps a named semaphore ``/NAME`` in ``/dev/shm/sem.NAME``, a mapped
``struct new_sem``. On 64-bit Linux (``__HAVE_64B_ATOMICS``) it is::

    uint64_t data;   /* bits 0-31: the value (SEM_VALUE_MASK), bits 32-63: nwaiters */
    int private;     /* 0 for process-shared */
    int pad;

little-endian on x86-64 and aarch64, so the count is the first 4 bytes of the file. A
process of the same uid opens the file and writes 5 there; every ``sem_wait`` then
returns at once. The harm is measured with a real critical section: several processes
increment a shared counter with a read-modify-write window under a semaphore of value 1.
Against esem the same adversary finds no file to write.
"""

from __future__ import annotations

from esem.attack.base import Outcome, Target
from esem.attack.critical import run_case

WORKERS = 4


def run(target: Target) -> list[Outcome]:
    iterations = 40 if target.quick else 150
    rows = []
    for backend in ("legacy", "esem"):
        r = run_case(backend, "tamper", iterations, workers=WORKERS)
        broken = r.lost_updates > 0 or r.max_inside > 1
        rows.append(Outcome(
            "A1 state tamper", backend, "broken" if broken else "defended",
            f"{r.processes} processes x {iterations} increments: up to {r.max_inside} inside "
            f"at once, {r.lost_updates} of {r.increments} updates lost; {r.evidence}",
        ))
    return rows
