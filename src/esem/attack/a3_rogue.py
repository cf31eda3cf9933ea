"""A3, rogue local process: another uid goes after a semaphore it does not own.

The victim is this (root) process; the rogue is a forked child that drops to ``nobody``
before it first talks to the service, so the service sees it through ``SO_PEERCRED`` as
another uid, and the kernel checks its file accesses as that uid. The victim creates a
mode-0600 semaphore of value 1 in each backend; the rogue then tries to

* open it by name (with and without ``O_CREAT``),
* use a handle id it saw (the victim's real 128-bit token) or guessed (random tokens),
* unlink the victim's name,
* post on it without holding a handle of its own,
* use the victim's own handle object, inherited across ``fork`` before the uid drop.

After every attempt the victim looks again through its own handle: a row is
``defended`` only when every attempt was refused with the expected error *and* the
victim still sees value 1 (and its name and handle still work). Legacy semaphores are
files in ``/dev/shm``: the kernel's file mode and the directory's sticky bit defend the
first four; the inherited mapping is a capability bound to no uid at all.

The fork/pipe plumbing (``spawn_as``, ``run_as``, ``attempt``) is shared with A4.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import secrets
import select
import signal
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import esem.posix_ipc as esem_posix_ipc
from esem.api import O_CREAT, USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.attack.base import Outcome, OutcomeKind, Target
from esem.client.blocking import Client
from esem.core.table import WaitMode
from esem.errors import EsemError, ExistentialError, PermissionsError
from esem.legacy import LegacySemaphore
from esem.legacy import unlink as legacy_unlink
from esem.protocol.constants import HANDLE_BYTES, Opcode, OpenFlag
from esem.protocol.messages import Request

CHILD_TIMEOUT = 8.0  # seconds a child may take before it is killed and the row fails
ROGUE_USER = "nobody"


# ------------------------------------------------------------------ plumbing


class Attempt(TypedDict):
    what: str  # the operation, in words
    allowed: bool  # it succeeded
    refused: bool  # it failed with one of the expected refusals
    error: str  # "PermissionsError(EACCES): ..." or "" when allowed


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, str(code)) if isinstance(code, int) else None
    if name:
        return f"{type(exc).__name__}({name})"
    text = str(exc)[:60]  # posix_ipc's exceptions carry a message, not an errno
    return f"{type(exc).__name__}({text})" if text else type(exc).__name__


def attempt(what: str, action: Callable[[], object],
            refused_by: tuple[type[BaseException], ...]) -> Attempt:
    """Run ``action`` and record whether it was allowed, or refused as expected."""
    try:
        action()
    except refused_by as exc:
        return Attempt(what=what, allowed=False, refused=True, error=_describe(exc))
    except Exception as exc:
        return Attempt(what=what, allowed=False, refused=False,
                       error=f"{_describe(exc)}: {exc}")
    return Attempt(what=what, allowed=True, refused=False, error="")


def summary(attempts: list[Attempt]) -> str:
    parts = []
    for a in attempts:
        parts.append(f"{a['what']} -> {'ALLOWED' if a['allowed'] else a['error']}")
    return "; ".join(parts)


def all_refused(attempts: list[Attempt]) -> bool:
    return bool(attempts) and all(a["refused"] for a in attempts)


def any_allowed(attempts: list[Attempt]) -> bool:
    return any(a["allowed"] for a in attempts)


def rogue_ids() -> tuple[int, int]:
    try:
        user = pwd.getpwnam(ROGUE_USER)
    except KeyError:
        return 65534, 65534
    return user.pw_uid, user.pw_gid


def drop_to(uid: int, gid: int) -> None:
    """Become ``uid``:``gid`` for good (real, effective and saved ids; no supplementary
    groups). A no-op for root staying root."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError(f"could not become uid {uid}")


class Channel:
    """Newline-delimited JSON over a pair of pipe descriptors, with a deadline."""

    def __init__(self, rfd: int, wfd: int, timeout: float = CHILD_TIMEOUT) -> None:
        self.rfd, self.wfd, self.timeout = rfd, wfd, timeout
        self._buf = b""

    def send(self, obj: object) -> None:
        data = json.dumps(obj).encode() + b"\n"
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self) -> Any:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message within {self.timeout}s")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                raise EOFError("peer closed the pipe")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        """Close both descriptors, once (a second close could hit a reused number)."""
        fds, self.rfd, self.wfd = (self.rfd, self.wfd), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


@dataclass
class Child:
    pid: int
    channel: Channel
    reaped: bool = False

    def result(self) -> Any:
        """The child's final message (its body's return value); raises if it crashed,
        hung or died."""
        try:
            msg = self.channel.recv()
        finally:
            self.reap()
        if "crash" in msg:
            raise RuntimeError(f"attack child failed: {msg['crash']}")
        return msg["result"]

    def kill(self) -> None:
        if not self.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.reap()

    def reap(self) -> None:
        """Collect the child; one that outlives ``CHILD_TIMEOUT`` is killed."""
        self.channel.close()
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not self.reaped:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.reaped = True
            elif time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                self.reaped = True
            else:
                time.sleep(0.005)


def spawn_as(uid: int, gid: int, body: Callable[[Channel], object],
             target: Target) -> Child:
    """Fork a child that becomes ``uid``:``gid`` and runs ``body(channel)``; its return
    value is sent back as the final message. The child leaves with ``os._exit``."""
    down_r, down_w = os.pipe()  # parent -> child
    up_r, up_w = os.pipe()  # child -> parent
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        ch = Channel(down_r, up_w)
        try:
            os.close(down_w)
            os.close(up_r)
            os.environ["ESEM_SOCKET"] = str(target.socket_path)
            drop_to(uid, gid)
            ch.send({"result": body(ch)})
        except BaseException as exc:
            code = 1
            with contextlib.suppress(BaseException):
                ch.send({"crash": f"{_describe(exc)}: {exc}\n{traceback.format_exc()}"})
        finally:
            os._exit(code)
    os.close(down_r)
    os.close(up_w)
    return Child(pid, Channel(up_r, down_w))


def run_as(uid: int, gid: int, body: Callable[[], object], target: Target) -> Any:
    """``body()`` in a forked child of ``uid``:``gid``; its (JSON) return value."""
    return spawn_as(uid, gid, lambda _ch: body(), target).result()


def new_client(target: Target) -> Client:
    return Client(target.socket_path, target.pubkey)


def check_reachable(target: Target, uid: int, gid: int) -> None:
    """Fail loudly, before any row is written, if ``uid`` cannot even reach the service
    (a socket under a directory it may not traverse): every attempt would then end in
    ``ServiceUnavailable``, which says nothing about the service's defences."""

    def probe() -> str:
        c = new_client(target)
        try:
            c.connect()
        except EsemError as exc:
            return f"{_describe(exc)}: {exc}"
        finally:
            c.close()
        return ""

    problem = run_as(uid, gid, probe, target)
    if problem:
        raise RuntimeError(f"uid {uid} cannot reach the esem service at "
                           f"{target.socket_path} (every directory above it must be "
                           f"traversable by other uids): {problem}")


def raw(client: Client, op: Opcode, handle: bytes, key: bytes | None = None) -> int:
    """One handle operation sent as a raw request; returns the reply's value."""
    req = (Request(op, 0, handle=handle, wait_mode=WaitMode.TRY) if op is Opcode.WAIT
           else Request(op, 0, handle=handle))
    return client.call(req, key=key).value


def _raw_action(client: Client, op: Opcode, handle: bytes,
                key: bytes | None = None) -> Callable[[], object]:
    return lambda: raw(client, op, handle, key)


def _spray(client: Client, guesses: int) -> Attempt:
    """ATTACH and POST with ``guesses`` random tokens each: every one must be EBADF."""
    tries = accepted = 0
    others: list[str] = []
    for _ in range(guesses):
        for op in (Opcode.ATTACH, Opcode.POST):
            tries += 1
            try:
                raw(client, op, secrets.token_bytes(HANDLE_BYTES))
                accepted += 1
            except ExistentialError:
                pass
            except EsemError as exc:
                others.append(_describe(exc))
    what = f"ATTACH and POST with {guesses} random tokens each"
    if accepted or others:
        return Attempt(what=what, allowed=accepted > 0, refused=False,
                       error=f"{accepted} accepted, other errors: {sorted(set(others))}")
    return Attempt(what=what, allowed=False, refused=True,
                   error=f"ExistentialError(EBADF) x{tries}")


def unique_name(tag: str) -> str:
    return f"/esem-{tag}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------ the victim


class _EsemVictim:
    """The owner's view of an esem semaphore: its own session, its own raw handle."""

    def __init__(self, target: Target) -> None:
        self.client = new_client(target)
        self.name = unique_name("a3")
        reply = self.client.call(Request(
            Opcode.OPEN, 0, name=self.name, oflag=OpenFlag.CREAT | OpenFlag.EXCL,
            mode=0o600, value=1))
        self.token = reply.handle
        # A second, API-level handle of the same session, for the inherited-handle case.
        sem = sem_open(self.name, flags=USE_ESEM, client=self.client)
        assert isinstance(sem, EsemSemaphore)
        self.sem = sem

    def state(self) -> tuple[bool, str]:
        """(unchanged, what the owner sees): value 1 through its handle, the handle
        works for a wait and a post, and the name still opens."""
        try:
            value = raw(self.client, Opcode.GETVALUE, self.token)
            raw(self.client, Opcode.WAIT, self.token)
            raw(self.client, Opcode.POST, self.token)
            again = raw(self.client, Opcode.GETVALUE, self.token)
            reopened = self.client.call(Request(Opcode.OPEN, 0, name=self.name))
            raw(self.client, Opcode.CLOSE, reopened.handle)
        except EsemError as exc:
            return False, f"owner's handle or name failed: {_describe(exc)}: {exc}"
        ok = value == 1 and again == 1
        return ok, (f"owner sees value {value}, its handle still waits and posts, "
                    "its name still opens")

    def close(self) -> None:
        with contextlib.suppress(EsemError):
            sem_unlink(self.name, flags=USE_ESEM, client=self.client)
        self.client.close()


class _LegacyVictim:
    def __init__(self) -> None:
        self.name = unique_name("a3")
        old = os.umask(0)
        try:
            self.sem = LegacySemaphore(self.name, create=True, excl=True, mode=0o600, value=1)
        finally:
            os.umask(old)
        self.path = f"/dev/shm/sem.{self.name[1:]}"

    def state(self) -> tuple[bool, str]:
        try:
            value = self.sem.getvalue()
            st = os.stat(self.path)
        except (OSError, EsemError) as exc:
            return False, f"owner's semaphore is gone: {_describe(exc)}: {exc}"
        ok = value == 1 and st.st_mode & 0o777 == 0o600
        return ok, f"owner sees value {value}, its file still there (mode {st.st_mode & 0o777:04o})"

    def close(self) -> None:
        with contextlib.suppress(EsemError):
            legacy_unlink(self.name)
        with contextlib.suppress(EsemError):
            self.sem.close()


def _row(label: str, backend: str, who: str, attempts: list[Attempt],
         unchanged: bool, seen: str, note: str = "") -> Outcome:
    """``defended`` only if every attempt was refused as expected and the owner's view is
    unchanged; anything else (an attempt allowed, the state changed, or an unexpected
    error that proves nothing) is ``broken``, with what was seen."""
    kind: OutcomeKind = "defended" if all_refused(attempts) and unchanged else "broken"
    if kind == "broken" and not any_allowed(attempts) and unchanged:
        note = f"{note} (a refusal was not the expected one)".strip()
    text = f"{who}: {summary(attempts)}. After: {seen}."
    return Outcome(label, backend, kind, f"{text} {note}".strip())


# --------------------------------------------------------------- esem attempts


def _esem_rows(target: Target, uid: int, gid: int, who: str) -> list[Outcome]:
    rows: list[Outcome] = []
    v = _EsemVictim(target)
    name, token = v.name, v.token
    guesses = 256 if target.quick else 4096
    try:
        def open_0600() -> list[Attempt]:
            c = new_client(target)
            return [
                attempt("open", lambda: sem_open(name, flags=USE_ESEM, client=c),
                        (PermissionsError,)),
                attempt("open O_CREAT 0666 value 5",
                        lambda: sem_open(name, O_CREAT, 0o666, 5, flags=USE_ESEM, client=c),
                        (PermissionsError,)),
                attempt("posix_ipc-style open", lambda: esem_posix_ipc.Semaphore(name),
                        (PermissionsError,)),
            ]

        res = run_as(uid, gid, open_0600, target)
        rows.append(_row("A3 open 0600", "esem", who, res, *v.state()))

        def guessed() -> list[Attempt]:
            c = new_client(target)
            out = [attempt(f"{op.name} with the owner's token", _raw_action(c, op, token),
                           (ExistentialError,))
                   for op in (Opcode.ATTACH, Opcode.POST, Opcode.WAIT, Opcode.GETVALUE,
                              Opcode.CLOSE)]
            out.append(_spray(c, guesses))
            return out

        res = run_as(uid, gid, guessed, target)
        rows.append(_row("A3 guessed handle", "esem", who, res, *v.state(),
                         "Handles are 128-bit random tokens bound to the session (and, for "
                         "ATTACH, to the holder's uid)."))

        def unlink_other() -> list[Attempt]:
            c = new_client(target)
            return [attempt("unlink", lambda: sem_unlink(name, flags=USE_ESEM, client=c),
                            (PermissionsError,))]

        res = run_as(uid, gid, unlink_other, target)
        rows.append(_row("A3 unlink other's", "esem", who, res, *v.state()))

        def post_without() -> list[Attempt]:
            c = new_client(target)

            def open_then_post() -> None:
                sem_open(name, flags=USE_ESEM, client=c).post()

            return [
                attempt("open-then-post", open_then_post, (PermissionsError,)),
                attempt("posix_ipc-style release",
                        lambda: esem_posix_ipc.Semaphore(name).release(), (PermissionsError,)),
                attempt("raw POST with an all-zero handle",
                        lambda: raw(c, Opcode.POST, bytes(HANDLE_BYTES)), (ExistentialError,)),
            ]

        res = run_as(uid, gid, post_without, target)
        rows.append(_row("A3 post without handle", "esem", who, res, *v.state(),
                         "No operation names a semaphore except through a handle of the "
                         "caller's own session."))

        sem = v.sem

        def inherited() -> list[Attempt]:
            return [attempt("post through the owner's inherited handle", sem.post,
                            (ExistentialError,)),
                    attempt("trywait through it", sem.trywait, (ExistentialError,))]

        res = run_as(uid, gid, inherited, target)
        rows.append(_row("A3 inherited handle", "esem", who, res, *v.state(),
                         "The child re-attaches the inherited token through its own session; "
                         "the service refuses because the token belongs to another uid."))
    finally:
        v.close()
    return rows


# ------------------------------------------------------------- legacy attempts


def _legacy_rows(target: Target, uid: int, gid: int, who: str) -> list[Outcome]:
    rows: list[Outcome] = []
    v = _LegacyVictim()
    name, path = v.name, v.path
    try:
        def open_0600() -> list[Attempt]:
            return [
                attempt("sem_open",
                        lambda: LegacySemaphore(name, create=False, excl=False, mode=0, value=0),
                        (PermissionsError,)),
                attempt("sem_open O_CREAT 0666 value 5",
                        lambda: LegacySemaphore(name, create=True, excl=False, mode=0o666,
                                                value=5),
                        (PermissionsError,)),
            ]

        res = run_as(uid, gid, open_0600, target)
        rows.append(_row("A3 open 0600", "legacy", who, res, *v.state(),
                         "Defended by the kernel's file mode on the /dev/shm file."))

        def guessed() -> list[Attempt]:
            return [
                attempt(f"open({path}, O_RDWR) to map the owner's sem_t",
                        lambda: os.close(os.open(path, os.O_RDWR)), (PermissionError,)),
                attempt("open it read-only", lambda: os.close(os.open(path, os.O_RDONLY)),
                        (PermissionError,)),
            ]

        res = run_as(uid, gid, guessed, target)
        rows.append(_row("A3 guessed handle", "legacy", who, res, *v.state(),
                         "A legacy handle is a mapping of the shared file, not an id: another "
                         "uid cannot map a 0600 file, though any process of the owner's uid "
                         "can (A1)."))

        def unlink_other() -> list[Attempt]:
            return [
                attempt("sem_unlink", lambda: legacy_unlink(name), (PermissionsError,)),
                attempt(f"unlink({path})", lambda: os.unlink(path), (PermissionError,)),
            ]

        res = run_as(uid, gid, unlink_other, target)
        rows.append(_row("A3 unlink other's", "legacy", who, res, *v.state(),
                         "Defended by the sticky bit of /dev/shm."))

        def post_without() -> list[Attempt]:
            def open_then_post() -> None:
                LegacySemaphore(name, create=False, excl=False, mode=0, value=0).post()

            return [attempt("open-then-post", open_then_post, (PermissionsError,))]

        res = run_as(uid, gid, post_without, target)
        rows.append(_row("A3 post without handle", "legacy", who, res, *v.state(),
                         "sem_post needs a mapping, and mapping needs an open that the file "
                         "mode refuses."))

        sem = v.sem

        def inherited() -> list[Attempt]:
            return [attempt("post through the owner's inherited mapping", sem.post,
                            (PermissionsError, ExistentialError))]

        res = run_as(uid, gid, inherited, target)
        unchanged, seen = v.state()
        rows.append(_row("A3 inherited handle", "legacy", who, res, unchanged, seen,
                         "A mapped sem_t is a capability bound to no uid: a process that "
                         "holds the mapping (inherited across fork, then setuid) posts no "
                         "matter who it is now."))
    finally:
        v.close()
    return rows


def run(target: Target) -> list[Outcome]:
    uid, gid = rogue_ids()
    check_reachable(target, uid, gid)
    who = f"{ROGUE_USER} (uid {uid}) against a mode-0600 semaphore of uid {os.getuid()}"
    esem_rows = _esem_rows(target, uid, gid, who)
    legacy_rows = _legacy_rows(target, uid, gid, who)
    return [row for pair in zip(legacy_rows, esem_rows, strict=True) for row in pair]
