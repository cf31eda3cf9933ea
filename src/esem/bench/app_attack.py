"""``esem bench app --attack``: the harm legacy semaphores let through, on a real server.

The program is PostgreSQL, whose backends sleep on unnamed process-shared POSIX
semaphores kept in the postmaster's main shared memory segment (an anonymous shared
mapping, ``/dev/zero (deleted)`` in ``/proc/PID/maps``, starting with PostgreSQL's
segment header magic). The adversary is a process with the power of PostgreSQL's own
uid over that memory (here root, through ``/proc/PID/mem``; a same-uid process has it
too whenever ptrace is allowed, and so has any code that runs inside any backend). It:

1. finds the segment and, in it, the semaphores the way glibc lays them out: 32-byte
   ``sem_t`` cells whose 64-bit word holds the count (low half) and the number of
   sleepers (high half), followed by ``private`` = 128 (FUTEX_SHARED); PostgreSQL puts
   them 128 bytes apart, so the array is the longest run of such cells at that stride;
2. while pgbench (TPC-B) runs, writes 0 over each cell's count word every millisecond.

Under legacy a sleeping backend is then never woken: the next ``sem_post`` sees no
sleeper in the word and skips the futex wake. The backend stays asleep holding its
transaction's row locks, every other client queues behind it, and pgbench's progress
drops to 0 tps; ``pg_stat_activity`` shows the stuck backends and how long they have
waited. Under ``esem run --all`` the same adversary finds the cells at the same place but
no count in them (the ``sem_t`` holds esem's magic word and a handle; the count is in
the service), so it has nothing to write, and pgbench finishes with its invariant
(sum of balances = sum of history deltas) intact.

What the ``sem_t`` still holds is a reference: the handle token that names the
e-semaphore, in the program's own memory (outside the threat model: DESIGN section 2).
A third run shows what that leaves: the handle-flipper writes into each cell, every
millisecond, alternately its own token and its neighbour's, so that a waiter and the
process that posts it can read different tokens and name different semaphores; every
count stays intact in the service, but the wake-up goes to the wrong semaphore and
PostgreSQL stalls as under legacy. (A uniform permutation of the tokens, written once,
is harmless: every process then reads the same token for a cell.)
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from esem.bench.app_servers import PgCluster, ServerError, Watched

PG_SHMEM_MAGIC = 679834894  # PGShmemMagic, the first int32 of the segment header
FUTEX_SHARED = 128  # glibc's sem_t.private for pshared = 1
ESEM_MAGIC = 0x6D65_7365_E5E5_E5E5  # what the preload library writes in an e-semaphore's sem_t
PG_SEM_STRIDE = 128  # PGSemaphoreData is padded to a cache line
MIN_RUN = 8  # fewer cells in a row are a coincidence of other data, not the array
SCAN_BYTES = 1 << 20
ZERO_EVERY = 0.001  # seconds between the adversary's passes
STALL_AFTER = 3.0  # seconds without a committed transaction that count as stalled


@dataclass
class Cells:
    base: int  # address of the segment in the postmaster
    glibc: list[int] = field(default_factory=list)  # addresses of glibc counts
    esem_cells: list[int] = field(default_factory=list)  # esem's magic, same stride

    @property
    def esem(self) -> int:
        return len(self.esem_cells)


def _runs(offsets: list[int], stride: int) -> list[int]:
    """The longest run of offsets ``stride`` apart (none when shorter than MIN_RUN)."""
    best: list[int] = []
    cur: list[int] = []
    for off in sorted(offsets):
        cur = [*cur, off] if cur and off - cur[-1] == stride else [off]
        if len(cur) > len(best):
            best = cur
    return best if len(best) >= MIN_RUN else []


def find_cells(pid: int) -> Cells:
    """The adversary's step 1 (see the module text)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if len(fields) < 2 or fields[1] != "rw-s":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start < SCAN_BYTES:
                continue
            mem.seek(start)
            head = mem.read(SCAN_BYTES)
            if struct.unpack_from("<i", head, 0)[0] != PG_SHMEM_MAGIC:
                continue
            glibc, esem = [], []
            for off in range(0, len(head) - 32, 8):
                word, private, pad = struct.unpack_from("<QII", head, off)
                if private == FUTEX_SHARED and pad == 0 and word >> 32 < 1 << 16 \
                        and word & 0xFFFFFFFF <= 0x7FFFFFFF:
                    glibc.append(off)
                elif word == ESEM_MAGIC:
                    esem.append(off)
            return Cells(start, [start + o for o in _runs(glibc, PG_SEM_STRIDE)],
                         [start + o for o in _runs(esem, PG_SEM_STRIDE)])
    raise ServerError(f"no PostgreSQL shared memory segment in /proc/{pid}/maps")


ZERO = b"\0" * 8


class Adversary:
    """The adversary's step 2, in a thread: every millisecond, write into each address
    the next of its byte strings (the count-zeroer: 8 zero bytes over each count word)."""

    def __init__(self, pid: int, writes: list[tuple[int, list[bytes]]]) -> None:
        self.pid, self.cells = pid, writes
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if not self.cells:
            return
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as mem:
            passes = 0
            while not self._stop.is_set():
                for addr, values in self.cells:
                    mem.seek(addr)
                    try:
                        mem.write(values[passes % len(values)])
                    except OSError:  # the server went away
                        return
                    self.writes += 1
                passes += 1
                time.sleep(ZERO_EVERY)

    def __enter__(self) -> Adversary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Outcome:
    config: str
    glibc_cells: int
    esem_cells: int
    writes: int
    finished: bool  # pgbench ended by itself
    transactions: int  # committed during the attack (pgbench's progress reports)
    stalled_s: float  # the longest stretch of 0 tps seen
    stuck: list[str]  # backends waiting longer than STALL_AFTER (pg_stat_activity)
    consistent: bool | None  # TPC-B's invariant after the run (None: not readable)
    sem_ops: float  # operations the service served during the run (esem)
    flipped: bool = False  # the handle-flipper, not the count-zeroer


def _progress_tps(stderr: str) -> list[float]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("progress:") and " tps," in line:
            out.append(float(line.split(",")[1].split()[0]))
    return out


def handle_flips(pid: int, cells: list[int]) -> list[tuple[int, list[bytes]]]:
    """The handle-flipper's writes: each e-semaphore cell's handle token, alternately its
    own and its neighbour's (a waiter and a poster that read the cell at different
    moments then name different semaphores). Tokens are copied, never invented."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        tokens = []
        for addr in cells:
            mem.seek(addr + 8)
            tokens.append(mem.read(16))
    return [(addr + 8, [tokens[i], tokens[(i + 1) % len(tokens)]])
            for i, addr in enumerate(cells)]


def attack_run(pg: PgCluster, config: str, seconds: float, clients: int,
               watched: Watched | None, flip_handles: bool = False) -> Outcome:
    """One attacked pgbench run on the started cluster ``pg``: the count-zeroer, or
    (``flip_handles``) the handle-flipper."""
    pid = pg.postmaster_pid
    cells = find_cells(pid)
    before = watched.scrape() if watched is not None else None
    limit = seconds + STALL_AFTER + 3
    plan = (handle_flips(pid, cells.esem_cells) if flip_handles
            else [(addr, [ZERO]) for addr in cells.glibc])
    with Adversary(pid, plan) as adv:
        bench = pg.popen_pgbench("-n", "-c", str(clients), "-j", "2", "-T", str(int(seconds)),
                                 "-P", "1")
        try:
            _, err = bench.communicate(timeout=limit)
            finished = bench.returncode == 0
            stuck: list[str] = []
        except subprocess.TimeoutExpired:  # stuck: read who waits, then stop it
            stuck = pg.psql(
                "select pid || ' ' || coalesce(wait_event_type, '-') || ':' || "
                "coalesce(wait_event, '-') || ' waiting ' || "
                "round(extract(epoch from now() - query_start)::numeric, 1) || ' s: ' || "
                "left(query, 60) from pg_stat_activity where backend_type = "
                f"'client backend' and state = 'active' and now() - query_start > "
                f"interval '{STALL_AFTER} seconds'", timeout=20).splitlines()
            bench.kill()
            _out, err = bench.communicate()
            finished = False
        writes = adv.writes
    after = watched.scrape() if watched is not None else None
    tps = _progress_tps(err)
    zero_run = longest = 0
    for v in tps:
        zero_run = zero_run + 1 if v == 0 else 0
        longest = max(longest, zero_run)
    consistent: bool | None = None
    if finished:
        a, d, _ = pg.tpcb_sums()
        consistent = a == d
    ops = Watched.sem_ops(before, after) if before is not None and after is not None else 0.0
    return Outcome(config, len(cells.glibc), cells.esem, writes, finished, round(sum(tps)),
                   float(longest), stuck, consistent, ops, flip_handles)


def describe(o: Outcome) -> str:
    """What was written and what the application saw, in one paragraph."""
    if o.flipped:
        found = (f"(handle-flipper) found the {o.esem_cells} e-semaphore cells and wrote "
                 "into each, every millisecond, alternately its own handle token and its "
                 f"neighbour's, {o.writes:,} writes in all")
    else:
            found = (f"found {o.glibc_cells} glibc semaphore counts in the postmaster's shared "
                 f"memory (128 bytes apart) and wrote 0 over each count word, {o.writes:,} "
                 "writes in all" if o.glibc_cells else
                 f"found no glibc semaphore count in the postmaster's shared memory: the "
                 f"{o.esem_cells} semaphore cells there hold esem's magic and a handle (the "
                 "counts are in the service), so it wrote nothing")
    if o.finished:
        seen = (f"pgbench finished: {o.transactions:,} transactions committed, longest "
                f"stretch at 0 tps {o.stalled_s:.0f} s, sum(abalance) "
                f"{'=' if o.consistent else '!='} sum(delta)")
    else:
        seen = (f"pgbench stalled and never finished ({o.transactions:,} transactions "
                f"committed, then {o.stalled_s:.0f} s at 0 tps); backends stuck: "
                + ("; ".join(o.stuck[:4]) if o.stuck else "none listed"))
    served = f"; the service served {o.sem_ops:,.0f} semaphore operations" if o.sem_ops else ""
    return f"{o.config}: the adversary {found}. {seen}{served}."


def stop_attacked(pg: PgCluster) -> None:
    """A backend asleep on a lost wake-up ignores the fast shutdown (it retries sem_wait
    on EINTR): give it a few seconds, then the process group is killed."""
    with contextlib.suppress(ServerError):
        pg.stop(timeout=8)


# ------------------------------------------------------------------- Apache
#
# Apache prefork's accept mutex (``Mutex posixsem``): root's parent makes it with
# ``sem_open`` and unlinks it at once, so it lives on only in the parent's and the
# children's shared mapping of the deleted file (``/dev/shm/sem.XXXXXX (deleted)`` in
# /proc/PID/maps). The mutex lets one child at a time wait for a connection (in
# epoll_wait, then accept); the others sleep in futex_wait. The adversary (root, or the
# owner of the mapping) writes a count of ``INFLATED`` into the sem_t's count word; from
# then on every child that comes for the mutex walks in, and several wait in accept at
# once: the mutual exclusion is gone. Who is where is read from /proc/CHILD/syscall
# (the main thread's current system call), sampled while ab loads the server and for a
# moment after. The load moves the children through the mutex (writing the count wakes
# none of its sleepers); once it stops, every child that got in under the inflated
# count waits in epoll_wait at once, where a busy server would only rarely show several
# (they are serving requests), while an intact mutex still lets exactly one in.

INFLATED = 64
SECTION_SYSCALLS = frozenset({"232", "281", "43", "288"})  # epoll_wait, epoll_pwait, accept(4)


def apache_children(parent: int) -> list[int]:
    pids: list[int] = []
    for f in Path(f"/proc/{parent}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in f.read_text().split()]
    return pids


def find_accept_mutex(pids: list[int]) -> tuple[int, int, str] | None:
    """(pid, address, mapping) of a glibc named semaphore mapped in any of ``pids``."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1] == "rw-s" and "/dev/shm/sem." in fields[5]:
                    return pid, int(fields[0].split("-")[0], 16), fields[5]
    return None


def _section(fds: list[int]) -> set[int]:
    """Indices of the children whose main thread is in epoll_wait or accept now."""
    inside = set()
    for i, fd in enumerate(fds):
        with contextlib.suppress(OSError, IndexError):
            if os.pread(fd, 64, 0).split()[0].decode() in SECTION_SYSCALLS:
                inside.add(i)
    return inside


SETTLE_SECONDS = 0.5  # sampling goes on this long after the load ends


def sample_section(children: list[int], load: subprocess.Popen[str],
                   settle: float = SETTLE_SECONDS) -> int:
    """The most children seen in the accept section at once while ``load`` runs and for
    ``settle`` seconds after it ended (the idle server: see above). A child counts when
    two reads in a row both find it there: one pass reads the children one after
    another, so a hand-off between two of them during a pass would otherwise look like
    both at once."""
    fds = []
    try:
        for pid in children:
            with contextlib.suppress(OSError):
                fds.append(os.open(f"/proc/{pid}/syscall", os.O_RDONLY))
        most = 0
        idle_until: float | None = None
        while idle_until is None or time.monotonic() < idle_until:
            if idle_until is None and load.poll() is not None:
                idle_until = time.monotonic() + settle
            most = max(most, len(_section(fds) & _section(fds)))
            time.sleep(0.001)
        return most
    finally:
        for fd in fds:
            os.close(fd)


@dataclass
class ApacheOutcome:
    config: str
    workers: int
    mapping: str  # where the adversary found the mutex ("" when it found none)
    old_word: int
    written: int
    before: int  # most children in the accept section at once, before the write
    after: int  # the same, after it
    failed: int  # ab's failed + non-2xx responses over both loads


def inflate(pid: int, addr: int) -> int:
    """Write INFLATED into the sem_t's count word (its low 32 bits, leaving the sleeper
    count); returns the 64-bit word read before."""
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(addr)
        old: int = struct.unpack("<Q", mem.read(8))[0]
        mem.seek(addr)
        mem.write(struct.pack("<I", INFLATED))
    return old


def describe_apache(o: ApacheOutcome) -> str:
    if o.mapping:
        found = (f"found the accept mutex's sem_t in {o.mapping}, shared by the parent and "
                 f"its {o.workers} children; read the word {o.old_word:#x} and wrote the "
                 f"count {o.written}")
    else:
        found = ("found no /dev/shm/sem.* mapping in any Apache process (the accept mutex "
                 "is in the service), so it wrote nothing")
    return (f"{o.config}: the adversary {found}. Children waiting in accept at once, under "
            f"ab load and just after it: at most {o.before} before, {o.after} after; "
            f"{o.failed} failed responses.")
