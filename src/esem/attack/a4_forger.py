"""A4, identity forger: a process the kernel presents under the victim's uid.

esem's owner and mode checks trust the uid that ``SO_PEERCRED`` reports, i.e. they trust
the kernel. A kernel that lies can present any process as the victim; here a root
process plays that part for real by ``setuid``-ing to the victim's uid before it
connects, so the service sees exactly what a lying kernel would show it.

The victim (a forked child of uid ``VICTIM_UID``) creates three mode-0600 semaphores of
value 1 and keeps its handles: a plain e-semaphore, a key-bound one, and a legacy one.
The forger then goes after each: open, take the unit, post twice, attach the victim's
handle token (which it is given, as if it had read it), unlink. Afterwards the victim
looks through its own handles.

* plain esem: ``broken``, by design. That is the documented limit of uid-based checks
  (docs/design.md section 2): whoever the kernel calls the owner is the owner. Key binding
  exists for exactly this adversary.
* key-bound esem: ``defended`` only when every operation was refused with
  ``KeyRejected`` (the raw handle operations, which name a token of another session, are
  refused ``EBADF`` before any key matters) and the victim still sees value 1, its name
  and its handle. The forger tries both as the victim's uid and as uid 0, which passes
  every mode and ownership check.
* legacy: ``broken``: the file's owner is the uid, and nothing else.

The same forger then goes after a native victim (``run_native``): a C program of the
victim's uid under the preload library that creates a plain (``sem_open`` with
``USE_ESEM``) and a key-bound (``esem_sem_open_keyed``) semaphore of value 1. The forger
is handed the handle tokens read out of the program's own ``sem_t`` memory (what a
process that reads the victim's memory, or a shared mapping, would steal) and makes the
same attempts; the C program then checks its semaphores through ``sem_getvalue``,
``sem_trywait``/``sem_post`` and a fresh open. Rows ``esem-native`` (the documented
limit again) and ``esem-native+key``; ``n/a`` where the native client cannot be built.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any, TypedDict

import esem.posix_ipc as esem_posix_ipc
from esem.api import O_CREAT, USE_ESEM, sem_open, sem_unlink
from esem.attack.a3_rogue import (
    Attempt,
    Channel,
    all_refused,
    any_allowed,
    attempt,
    check_reachable,
    new_client,
    raw,
    run_as,
    spawn_as,
    summary,
    unique_name,
)
from esem.attack.base import Outcome, OutcomeKind, Target
from esem.attack.native_victim import NativeBuild, NativeSem, NativeVictim
from esem.attack.native_victim import build as build_native
from esem.errors import EsemError, ExistentialError, KeyRejected
from esem.legacy import LegacySemaphore
from esem.legacy import unlink as legacy_unlink
from esem.protocol.constants import Opcode, OpenFlag
from esem.protocol.messages import Request

VICTIM_UID = 23456  # an unprivileged uid with no account: the service sees only numbers
VICTIM_GID = 23456
KEY_BYTES = 32
FORGED = (EsemError, OSError)  # any refusal at all counts as one for the unkeyed attacks


class View(TypedDict):
    value: int  # through the victim's own handle, -1 if that failed
    named: bool  # the name still opens (for legacy: the file still exists)
    handle_works: bool  # the victim's handle still waits and posts
    error: str


def _describe_view(v: View) -> str:
    if v["error"]:
        return f"victim's handle failed: {v['error']}"
    return (f"victim sees value {v['value']}, "
            f"name {'still there' if v['named'] else 'GONE'}, "
            f"its handle {'still works' if v['handle_works'] else 'FAILED'}")


def _unchanged(v: View) -> bool:
    return not v["error"] and v["value"] == 1 and v["named"] and v["handle_works"]


def run(target: Target) -> list[Outcome]:
    """Every row: the Python client's and legacy's, then the native client's."""
    return run_python(target) + run_native(target)


def run_python(target: Target) -> list[Outcome]:
    plain, keyed, lname = unique_name("a4"), unique_name("a4k"), unique_name("a4l")
    key = secrets.token_bytes(KEY_BYTES)
    wrong = secrets.token_bytes(KEY_BYTES)

    # ------------------------------------------------------------ the victim

    def victim(ch: Channel) -> dict[str, View]:
        os.umask(0)
        c = new_client(target)
        crex = OpenFlag.CREAT | OpenFlag.EXCL
        p_tok = c.call(Request(Opcode.OPEN, 0, name=plain, oflag=crex, mode=0o600,
                               value=1)).handle
        k_tok = c.call(Request(Opcode.OPEN, 0, name=keyed, oflag=crex, mode=0o600, value=1,
                               key=key), key=key).handle
        leg = LegacySemaphore(lname, create=True, excl=True, mode=0o600, value=1)
        ch.send({"plain": p_tok.hex(), "keyed": k_tok.hex()})
        if ch.recv() != "check":
            raise RuntimeError("unexpected command")

        def esem_view(name: str, tok: bytes, k: bytes | None) -> View:
            try:
                value = raw(c, Opcode.GETVALUE, tok, k)
                works = True
                try:
                    if value > 0:
                        raw(c, Opcode.WAIT, tok, k)
                        raw(c, Opcode.POST, tok, k)
                except EsemError:
                    works = False
                try:
                    reopened = c.call(Request(Opcode.OPEN, 0, name=name), key=k).handle
                    raw(c, Opcode.CLOSE, reopened, k)
                    named = True
                except ExistentialError:
                    named = False
            except EsemError as exc:
                return View(value=-1, named=False, handle_works=False,
                            error=f"{type(exc).__name__}: {exc}")
            return View(value=value, named=named, handle_works=works, error="")

        def legacy_view() -> View:
            try:
                value = leg.getvalue()
                works = True
                try:
                    if value > 0:
                        leg.trywait()
                        leg.post()
                except EsemError:
                    works = False
            except EsemError as exc:
                return View(value=-1, named=False, handle_works=False,
                            error=f"{type(exc).__name__}: {exc}")
            named = os.path.exists(f"/dev/shm/sem.{lname[1:]}")
            return View(value=value, named=named, handle_works=works, error="")

        views = {"esem": esem_view(plain, p_tok, None),
                 "esem+key": esem_view(keyed, k_tok, key),
                 "legacy": legacy_view()}
        for name, k in ((plain, None), (keyed, key)):
            with contextlib.suppress(EsemError):
                sem_unlink(name, flags=USE_ESEM, key=k, client=c)
        with contextlib.suppress(EsemError):
            legacy_unlink(lname)
        c.close()
        return views

    # ------------------------------------------------------------ the forger

    def forge_plain(token: bytes) -> list[Attempt]:
        return _forge_plain(target, plain, token)

    def forge_keyed(token: bytes) -> list[Attempt]:
        return _forge_keyed(target, keyed, token, wrong)

    def forge_legacy() -> list[Attempt]:
        opened: list[LegacySemaphore] = []
        return [
            attempt("sem_open", lambda: opened.append(
                LegacySemaphore(lname, create=False, excl=False, mode=0, value=0)), FORGED),
            attempt("trywait (take the victim's unit)", lambda: opened[0].trywait(), FORGED),
            attempt("post", lambda: opened[0].post(), FORGED),
            attempt("post", lambda: opened[0].post(), FORGED),
            attempt("sem_unlink", lambda: legacy_unlink(lname), FORGED),
        ]

    # ------------------------------------------------------------ the play

    check_reachable(target, VICTIM_UID, VICTIM_GID)
    v_child = spawn_as(VICTIM_UID, VICTIM_GID, victim, target)
    try:
        tokens = v_child.channel.recv()
        if "crash" in tokens:
            raise RuntimeError(f"victim failed: {tokens['crash']}")
        p_tok, k_tok = bytes.fromhex(tokens["plain"]), bytes.fromhex(tokens["keyed"])
        as_victim = (VICTIM_UID, VICTIM_GID)
        plain_res: list[Attempt] = run_as(*as_victim, lambda: forge_plain(p_tok), target)
        keyed_res: list[Attempt] = run_as(*as_victim, lambda: forge_keyed(k_tok), target)
        keyed_root: list[Attempt] = run_as(0, 0, lambda: forge_keyed(k_tok), target)
        legacy_res: list[Attempt] = run_as(*as_victim, forge_legacy, target)
        v_child.channel.send("check")
        views: dict[str, View] = v_child.result()
    finally:
        v_child.kill()
        _cleanup(target, plain, keyed, key, lname)

    who = (f"forger: a root process that setuid()s to the victim's uid {VICTIM_UID} before "
           "connecting, so SO_PEERCRED names the victim, as a lying kernel would")
    rows: list[Outcome] = []

    kind: OutcomeKind = "broken" if any_allowed(legacy_res) or not _unchanged(
        views["legacy"]) else "defended"
    rows.append(Outcome(
        "A4 forged uid", "legacy", kind,
        f"{who}: {summary(legacy_res)}. After: {_describe_view(views['legacy'])}. A legacy "
        "semaphore's only guard is its file's owner uid; whoever holds that uid owns it."))

    kind = "broken" if any_allowed(plain_res) or not _unchanged(views["esem"]) else "defended"
    rows.append(Outcome(
        "A4 forged uid", "esem", kind,
        f"{who}: {summary(plain_res)}. After: {_describe_view(views['esem'])}. This is the "
        "documented limit of uid-based checks (docs/design.md section 2): the service can only "
        "trust the uid the kernel vouches for, so a kernel that lies about it (or root "
        "taking the uid) passes every owner and mode check. Key binding exists for this "
        "adversary: see the esem+key row.", documented_limit=True))

    defended = (all_refused(keyed_res) and all_refused(keyed_root)
                and _unchanged(views["esem+key"]))
    kind = "defended" if defended else "broken"
    as_root = ("refused identically" if summary(keyed_root) == summary(keyed_res)
               else summary(keyed_root))
    rows.append(Outcome(
        "A4 forged uid", "esem+key", kind,
        f"{who}: {summary(keyed_res)}. The same {len(keyed_root)} attempts as uid 0 (which "
        f"passes every mode and ownership check): {as_root}. After: "
        f"{_describe_view(views['esem+key'])}. Every operation on a key-bound semaphore "
        "must carry a MAC under its key, which no uid confers; the raw handle operations "
        "fail earlier, since a token is valid only in the session it was issued to."))
    return rows


def _forge_plain(target: Target, plain: str, token: bytes) -> list[Attempt]:
    """The forger against a plain e-semaphore of the victim's, given its handle token."""
    c = new_client(target)
    opened: list[Any] = []
    return [
        attempt("open", lambda: opened.append(sem_open(plain, flags=USE_ESEM, client=c)),
                FORGED),
        attempt("trywait (take the victim's unit)", lambda: opened[0].trywait(), FORGED),
        attempt("post", lambda: opened[0].post(), FORGED),
        attempt("post", lambda: opened[0].post(), FORGED),
        attempt("ATTACH the victim's token", lambda: raw(c, Opcode.ATTACH, token), FORGED),
        attempt("unlink", lambda: sem_unlink(plain, flags=USE_ESEM, client=c), FORGED),
    ]


def _forge_keyed(target: Target, keyed: str, token: bytes, wrong: bytes) -> list[Attempt]:
    """The forger against a key-bound one: without the key, with a wrong one (forged
    MACs), with the stolen token."""
    c = new_client(target)
    kr = (KeyRejected,)
    return [
        attempt("open", lambda: sem_open(keyed, flags=USE_ESEM, client=c), kr),
        attempt("open O_CREAT value 5",
                lambda: sem_open(keyed, O_CREAT, 0o600, 5, flags=USE_ESEM, client=c), kr),
        attempt("open with a wrong key",
                lambda: sem_open(keyed, flags=USE_ESEM, key=wrong, client=c), kr),
        attempt("posix_ipc-style release", lambda: esem_posix_ipc.Semaphore(keyed).release(),
                kr),
        attempt("ATTACH the victim's token", lambda: raw(c, Opcode.ATTACH, token), kr),
        attempt("ATTACH it with a wrong key",
                lambda: raw(c, Opcode.ATTACH, token, wrong), kr),
        attempt("raw POST with the victim's token",
                lambda: raw(c, Opcode.POST, token), (ExistentialError,)),
        attempt("raw WAIT with the victim's token",
                lambda: raw(c, Opcode.WAIT, token), (ExistentialError,)),
        attempt("unlink", lambda: sem_unlink(keyed, flags=USE_ESEM, client=c), kr),
        attempt("unlink with a wrong key",
                lambda: sem_unlink(keyed, flags=USE_ESEM, key=wrong, client=c), kr),
    ]


NATIVE_BACKENDS = ("esem-native", "esem-native+key")


def run_native(target: Target, native: NativeBuild | str | None = None) -> list[Outcome]:
    """The forger against a C program's semaphores (native client, preload library)."""
    if native is None:
        native = build_native(target.workdir)
    if isinstance(native, str):
        return [Outcome("A4 forged uid", b, "n/a",
                        f"the native client cannot be attacked on this machine: {native}")
                for b in NATIVE_BACKENDS]
    plain, keyed = unique_name("a4n"), unique_name("a4nk")
    key, wrong = secrets.token_bytes(KEY_BYTES), secrets.token_bytes(KEY_BYTES)
    check_reachable(target, VICTIM_UID, VICTIM_GID)
    as_victim = (VICTIM_UID, VICTIM_GID)
    victims = [NativeVictim(native, target.socket_path, target.pubkey, user=as_victim)
               for _ in range(2)]
    try:
        p_sem = NativeSem.create(victims[0], plain, 1, None)
        k_sem = NativeSem.create(victims[1], keyed, 1, key)
        plain_res: list[Attempt] = run_as(*as_victim, lambda: _forge_plain(
            target, plain, p_sem.token), target)
        keyed_res: list[Attempt] = run_as(*as_victim, lambda: _forge_keyed(
            target, keyed, k_sem.token, wrong), target)
        keyed_root: list[Attempt] = run_as(0, 0, lambda: _forge_keyed(
            target, keyed, k_sem.token, wrong), target)
        views: dict[str, View] = {}
        for backend, sem, name, k in (("esem-native", p_sem, plain, None),
                                      ("esem-native+key", k_sem, keyed, key)):
            value, named, works, error = sem.view(name, k)
            views[backend] = View(value=value, named=named, handle_works=works, error=error)
            with contextlib.suppress(EsemError):
                sem.unlink(name, k)
    finally:
        for v in victims:
            v.close()
        _cleanup(target, plain, keyed, key, "")

    who = (f"forger: a root process that setuid()s to uid {VICTIM_UID} of the victim, a C "
           "program under the preload library, and is handed the handle tokens read out of "
           "the program's sem_t memory")
    kind: OutcomeKind = ("broken" if any_allowed(plain_res) or not _unchanged(
        views["esem-native"]) else "defended")
    rows = [Outcome(
        "A4 forged uid", "esem-native", kind,
        f"{who}: {summary(plain_res)}. After, the C program: "
        f"{_describe_view(views['esem-native'])}. The documented limit of uid-based "
        "checks, as for the Python client: key binding is the defence (esem-native+key).",
        documented_limit=True)]
    defended = (all_refused(keyed_res) and all_refused(keyed_root)
                and _unchanged(views["esem-native+key"]))
    as_root = ("refused identically" if summary(keyed_root) == summary(keyed_res)
               else summary(keyed_root))
    rows.append(Outcome(
        "A4 forged uid", "esem-native+key", "defended" if defended else "broken",
        f"{who}: {summary(keyed_res)}. The same {len(keyed_root)} attempts as uid 0: "
        f"{as_root}. After, the C program (esem_sem_open_keyed, every sem_* call MAC'd "
        f"by the native client): {_describe_view(views['esem-native+key'])}."))
    return rows


def _cleanup(target: Target, plain: str, keyed: str, key: bytes, lname: str) -> None:
    """As root, remove whatever the victim could not (root may unlink any name)."""
    c = new_client(target)
    try:
        for name, k in ((plain, None), (keyed, key)):
            with contextlib.suppress(EsemError):
                sem_unlink(name, flags=USE_ESEM, key=k, client=c)
    finally:
        c.close()
    if lname:
        with contextlib.suppress(EsemError):
            legacy_unlink(lname)
