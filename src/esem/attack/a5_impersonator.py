"""A5, service impersonator: a fake service with another static key on the socket path.

The adversary controls what answers on the path a client connects to (it replaced the
socket, or got there first), but not the real service's private key. Each fake below is
a real listening Unix socket in ``target.workdir``, served by a thread of this process;
the victim is an ordinary ``Client`` pinned to the real service's public key
(``target.pubkey``, as ``ESEM_PUBKEY`` or the argument would pin it) and pointed at the
fake's path. The fake also publishes its own public key beside its socket, as an
impersonator would; the pinned victim must ignore it.

* ``other key``: a fake that speaks the real protocol (``ServerSession``) with its own
  generated key. The victim's HELLO is sealed to the pinned key, so the fake cannot read
  it; it answers with the best it has, a well-formed WELCOME made with its own key. A
  control client that trusts the fake's key is served by the same fake (it gets a handle
  and a "granted" wait the real service never gave), which shows the fake is complete
  and that pinning is what stops it.
* ``recorded WELCOME``: the fake opens a session with the real service and hands the
  victim the real service's genuine WELCOME (made for another ephemeral key).
* ``forged WELCOME``: a WELCOME frame of the right shape with random bytes.
* garbage: the fake closes after the HELLO, answers random bytes, an oversized length,
  another version, a forged REFUSED, or never answers.

Every attempt must end in an ``EsemError`` (``IntegrityError`` for the three
protocol-speaking fakes) and never in a returned handle; the fake must never receive a
request.

``A5 squatted default path`` (as root, with two uids): the victim does not pin a key of
its own but uses the default configuration of a non-root client without
``XDG_RUNTIME_DIR``, which looks in ``/tmp/esem-UID`` and pins whatever key is published
there; ``nobody`` creates that directory first with the protocol-speaking fake. The row
is ``defended`` only if the client refuses it.

The rows of ``a5_files`` (the impersonator steering the service's files: a planted
link, a foreign socket directory, a swapped link) follow these.

Legacy semaphores have no service, hence nothing to impersonate: ``n/a``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from esem.api import O_CREAT, USE_ESEM, sem_open
from esem.attack.base import Outcome, Target, reap
from esem.client.blocking import Client
from esem.core.status import Status
from esem.errors import EsemError, IntegrityError
from esem.paths import pubkey_path
from esem.protocol.constants import MAX_FRAME_BODY, VERSION, FrameKind, Opcode
from esem.protocol.crypto import generate_static_key, public_key_of
from esem.protocol.frames import encode_frame
from esem.protocol.messages import Reply
from esem.protocol.session import ClientSession, ServerSession

LABEL = "A5 impersonator"
GARBAGE_LABEL = "A5 impersonator garbage"
SQUAT_LABEL = "A5 squatted default path"
VICTIM_TIMEOUT = 1.5  # seconds: the victim's connect + handshake timeout
FAKE_TIMEOUT = 5.0  # seconds a fake waits for its victim before giving up
HELLO_BYTES = 4 + 2 + 48  # a whole HELLO frame on the wire


@dataclass
class FakeLog:
    """What the fake saw and did."""

    hello_bytes: int = 0  # bytes of the victim's first frame (the HELLO)
    extra_bytes: int = 0  # bytes the victim sent after its HELLO
    hello_refused: str = ""  # why the fake's own ServerSession refused the HELLO
    requests: list[str] = field(default_factory=list)  # requests the fake decrypted
    error: str = ""  # an unexpected failure of the fake itself


Behaviour = Callable[[socket.socket, FakeLog], None]


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _read_frame(conn: socket.socket) -> bytes:
    """One whole frame (prefix included) or what arrived before the peer stopped."""
    head = _recv_exact(conn, 4)
    if len(head) < 4:
        return head
    (n,) = struct.unpack(">I", head)
    if not 1 <= n <= MAX_FRAME_BODY:
        return head
    return head + _recv_exact(conn, n)


def _drain(conn: socket.socket, log: FakeLog) -> None:
    """Count whatever else the victim sends until it hangs up."""
    with contextlib.suppress(OSError):
        while data := conn.recv(65536):
            log.extra_bytes += len(data)


def _own_welcome(private: bytes) -> bytes:
    """A well-formed WELCOME frame made with ``private``: the fake's best answer to a
    HELLO it cannot read."""
    helper = ClientSession(public_key_of(private))
    server = ServerSession(private)
    server.receive_data(helper.start())
    return server.data_to_send()


def _fake_reply(opcode: Opcode, req_id: int) -> Reply:
    """Success for everything: what a victim that accepted the fake would be told."""
    if opcode in (Opcode.OPEN, Opcode.ATTACH):
        return Reply(opcode, req_id, Status.OK, handle=secrets.token_bytes(16),
                     created=opcode is Opcode.OPEN)
    if opcode in (Opcode.GETVALUE, Opcode.CANCEL):
        return Reply(opcode, req_id, Status.OK, value=1)
    if opcode in (Opcode.LIST, Opcode.STAT):
        return Reply(opcode, req_id, Status.OK, data=b'{"total": 0, "offset": 0, "entries": []}')
    return Reply(opcode, req_id, Status.OK)  # WAIT: a grant the real service never gave


def protocol_fake(private: bytes) -> Behaviour:
    """A fake service speaking the real protocol with ``private``."""

    def behave(conn: socket.socket, log: FakeLog) -> None:
        session = ServerSession(private)
        hello = _read_frame(conn)
        log.hello_bytes = len(hello)
        try:
            session.receive_data(hello)
            conn.sendall(session.data_to_send())
        except EsemError as exc:  # sealed to another key: answer with our own WELCOME
            log.hello_refused = str(exc)
            conn.sendall(_own_welcome(private))
            _drain(conn, log)
            return
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                log.extra_bytes += len(data)
                for event in session.receive_data(data):
                    req = event.request
                    log.requests.append(req.opcode.name)
                    session.send_reply(_fake_reply(req.opcode, req.req_id))
                conn.sendall(session.data_to_send())

    return behave


def recorded_welcome_fake(real_socket: Path, real_pubkey: bytes) -> Behaviour:
    """Hand the victim a genuine WELCOME of the real service, from another session."""

    def behave(conn: socket.socket, log: FakeLog) -> None:
        log.hello_bytes = len(_read_frame(conn))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as real:
            real.settimeout(FAKE_TIMEOUT)
            real.connect(str(real_socket))
            real.sendall(ClientSession(real_pubkey).start())
            welcome = _read_frame(real)
        conn.sendall(welcome)
        _drain(conn, log)

    return behave


def answer_fake(answer: bytes | None, *, silent: bool = False) -> Behaviour:
    """Read the HELLO, then send ``answer`` (None: hang up; ``silent``: say nothing)."""

    def behave(conn: socket.socket, log: FakeLog) -> None:
        log.hello_bytes = len(_read_frame(conn))
        if answer is not None:
            conn.sendall(answer)
        if answer is not None or silent:
            _drain(conn, log)

    return behave


def _handshake_frame(version: int, kind: int, payload: bytes) -> bytes:
    return encode_frame(bytes((version, kind)) + payload)


@dataclass
class Attempt:
    variant: str
    result: str  # "returned a handle", or the exception's type and message
    refused: bool  # an EsemError ended the attempt
    integrity: bool  # that error was an IntegrityError
    log: FakeLog


def impersonate(
    directory: Path, variant: str, behave: Behaviour, pin: bytes, fake_pub: bytes
) -> Attempt:
    """Serve one connection at ``directory/variant.sock`` with ``behave`` while a victim
    pinned to ``pin`` tries to create a semaphore there."""
    path = directory / f"{variant.replace(' ', '-')}.sock"
    pubkey_path(path).write_text(fake_pub.hex() + "\n")  # the fake's own, unpinned
    log = FakeLog()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(FAKE_TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            log.error = f"no victim came: {exc}"
            return
        with conn:
            conn.settimeout(FAKE_TIMEOUT)
            try:
                behave(conn, log)
            except (OSError, EsemError) as exc:
                log.error = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=serve, name=f"a5-fake-{variant}", daemon=True)
    thread.start()
    victim = Client(path, pubkey=pin, connect_timeout=VICTIM_TIMEOUT)
    try:
        sem = sem_open(f"/esem-a5-{secrets.token_hex(6)}", O_CREAT, 0o600, 1,
                       flags=USE_ESEM, client=victim)
        if variant == "control":
            sem.wait()  # the fake "grants" it
        attempt = Attempt(variant, f"returned a handle ({sem!r})", False, False, log)
    except EsemError as exc:
        msg = str(exc).splitlines()[0]
        attempt = Attempt(variant, f"{type(exc).__name__}: {msg}", True,
                          isinstance(exc, IntegrityError), log)
    except Exception as exc:  # not esem's contract: reported, never counted as refused
        attempt = Attempt(variant, f"unexpected {type(exc).__name__}: {exc}", False, False, log)
    finally:
        victim.close()
        thread.join(FAKE_TIMEOUT + 1)
        listener.close()
        path.unlink(missing_ok=True)
    return attempt


def _describe(a: Attempt) -> str:
    seen = f"fake got a {a.log.hello_bytes}-byte HELLO"
    if a.log.hello_refused:
        seen += f" it could not read ({a.log.hello_refused}) and sent its own WELCOME"
    if a.log.extra_bytes:
        seen += f" and {a.log.extra_bytes} more bytes"
    if a.log.requests:
        seen += f", decrypted {len(a.log.requests)} requests ({', '.join(a.log.requests)})"
    if a.log.error:
        seen += f"; fake error: {a.log.error}"
    return f"{a.variant}: {a.result} ({seen})"


def _in_child(uid: int, gid: int, body: Callable[[Callable[[], None]], dict[str, object]],
              ) -> tuple[int, int]:
    """Fork ``body`` as ``uid``; it may call its argument once to say "ready". Returns the
    pid and the read end of its report pipe (one byte "r" when ready, then JSON)."""
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(out_r)
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)

                def ready() -> None:
                    os.write(out_w, b"r")

                result = body(ready)
                code = 0
            except BaseException as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(out_w, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(out_w)
    return pid, out_r


def _read_child(pid: int, fd: int, timeout: float, ready_only: bool = False) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        if ready_only and data.startswith(b"r"):
            return {"ready": True}
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            break
        data += chunk
    os.close(fd)
    reap(pid, 2)  # it has reported (or timed out): let it exit
    try:
        result: dict[str, object] = json.loads(data.removeprefix(b"r") or b"null") or {}
    except ValueError:
        result = {}
    return result or {"error": "the child reported nothing"}


def squat(fake_private: bytes) -> Outcome:
    """A client with the default configuration, where another uid got there first.

    Without ``ESEM_SOCKET``, ``ESEM_PUBKEY`` and ``XDG_RUNTIME_DIR``, a client of a
    non-root uid U looks for ``/tmp/esem-U/esem.sock`` and pins the key published beside
    it. ``/tmp`` is writable by every uid: ``nobody`` creates that directory first, with
    its fake service and its own key, before U's service ever starts.
    """
    if os.geteuid() != 0:
        return Outcome(SQUAT_LABEL, "esem", "n/a", "needs root to play two uids")
    uid = next(u for u in range(424200, 425200)
               if not Path(f"/tmp/esem-{u}").exists() and not _has_user(u))
    directory = Path(f"/tmp/esem-{uid}")
    nobody = pwd.getpwnam("nobody")

    def squatter(ready: Callable[[], None]) -> dict[str, object]:
        directory.mkdir(mode=0o755)
        path = directory / "esem.sock"
        pubkey_path(path).write_text(public_key_of(fake_private).hex() + "\n")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            os.chmod(path, 0o666)
            listener.listen(1)
            listener.settimeout(FAKE_TIMEOUT)
            ready()
            conn, _ = listener.accept()
            log = FakeLog()
            with conn:
                conn.settimeout(FAKE_TIMEOUT)
                protocol_fake(fake_private)(conn, log)
        return {"requests": log.requests}

    def victim(ready: Callable[[], None]) -> dict[str, object]:
        from esem.client import blocking

        for var in ("ESEM_SOCKET", "ESEM_PUBKEY", "ESEM_DIR", "XDG_RUNTIME_DIR"):
            os.environ.pop(var, None)
        blocking._process_client = None
        try:
            sem = sem_open("/esem-a5-squat", O_CREAT, 0o600, 0, flags=USE_ESEM)
            sem.wait()  # the semaphore was created at 0: only a fake grants this
            return {"accepted": f"sem_open returned {sem!r} and a wait on it at value 0 "
                                "returned"}
        except EsemError as exc:
            return {"refused": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        finally:
            if blocking._process_client is not None:
                blocking._process_client.close()

    try:
        s_pid, s_fd = _in_child(nobody.pw_uid, nobody.pw_gid, squatter)
        up = _read_child(s_pid, s_fd, FAKE_TIMEOUT, ready_only=True)
        if "ready" not in up:
            return Outcome(SQUAT_LABEL, "esem", "broken", f"the squatter failed: {up}")
        v_pid, v_fd = _in_child(uid, uid, victim)
        seen = _read_child(v_pid, v_fd, FAKE_TIMEOUT * 2)
        fake = _read_child(s_pid, s_fd, FAKE_TIMEOUT)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    where = (f"a client of uid {uid} with the default configuration (no ESEM_SOCKET, "
             f"ESEM_PUBKEY or XDG_RUNTIME_DIR) looks for {directory}/esem.sock and pins the "
             f"key published beside it; uid {nobody.pw_uid} created {directory} first, with "
             "a fake service and its own key")
    if "refused" in seen:
        return Outcome(SQUAT_LABEL, "esem", "defended", f"{where}; the client refused it: "
                       f"{seen['refused']}; the fake decrypted {fake.get('requests')}")
    if "accepted" in seen:
        return Outcome(SQUAT_LABEL, "esem", "broken", f"{where}; the client accepted it: "
                       f"{seen['accepted']}; the fake decrypted requests "
                       f"{fake.get('requests')}")
    return Outcome(SQUAT_LABEL, "esem", "broken", f"{where}; the victim failed: {seen}")


def _has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def run(target: Target) -> list[Outcome]:
    directory = target.workdir / f"a5-{secrets.token_hex(4)}"
    directory.mkdir(mode=0o755)
    fake_private = generate_static_key()
    fake_pub = public_key_of(fake_private)
    pin = target.pubkey

    protocol_variants: list[tuple[str, Behaviour]] = [
        ("other key", protocol_fake(fake_private)),
        ("recorded WELCOME", recorded_welcome_fake(target.socket_path, pin)),
        ("forged WELCOME", answer_fake(
            _handshake_frame(VERSION, FrameKind.WELCOME, os.urandom(48)))),
    ]
    garbage_variants: list[tuple[str, Behaviour]] = [
        ("hang up", answer_fake(None)),
        ("random bytes", answer_fake(os.urandom(256))),
        ("oversized length", answer_fake(struct.pack(">I", 0x7FFFFFFF) + os.urandom(64))),
        ("zero length", answer_fake(struct.pack(">I", 0) + os.urandom(16))),
        ("other version", answer_fake(
            _handshake_frame(VERSION + 1, FrameKind.WELCOME, os.urandom(48)))),
        ("unknown kind", answer_fake(_handshake_frame(VERSION, 0x7F, os.urandom(48)))),
        ("forged REFUSED", answer_fake(_handshake_frame(
            VERSION, FrameKind.REFUSED, struct.pack(">H", Status.EDQUOT) + b"go away"))),
        ("silence", answer_fake(None, silent=True)),
    ]
    try:
        control = impersonate(directory, "control", protocol_fake(fake_private),
                              fake_pub, fake_pub)
        protocol = [impersonate(directory, v, b, pin, fake_pub) for v, b in protocol_variants]
        garbage = [impersonate(directory, v, b, pin, fake_pub) for v, b in garbage_variants]
    finally:
        for leftover in directory.iterdir():
            leftover.unlink()
        directory.rmdir()

    pinned = f"victim pinned to the real key {pin.hex()[:16]}.., fake key {fake_pub.hex()[:16]}.."
    fake_real = not control.refused and "WAIT" in control.log.requests
    held = all(a.refused and a.integrity and not a.log.requests for a in protocol)
    rows = [Outcome(
        LABEL, "esem", "defended" if held and fake_real else "broken",
        f"{pinned}; {len(protocol)} protocol-speaking fakes, "
        f"{sum(a.integrity for a in protocol)} refused with IntegrityError, "
        f"{sum(bool(a.log.requests) for a in protocol)} received a request: "
        + "; ".join(_describe(a) for a in protocol)
        + f". Control, a client that trusts the fake's own key: {_describe(control)}"
        + ("" if fake_real else " (the control was not served: the fake is not proven real)"),
    )]
    held = all(a.refused and not a.log.requests for a in garbage)
    rows.append(Outcome(
        GARBAGE_LABEL, "esem", "defended" if held else "broken",
        f"{pinned}; {len(garbage)} fakes answering the HELLO with garbage, "
        f"{sum(a.refused for a in garbage)} refused with an EsemError, "
        f"{sum(not a.refused for a in garbage)} did not: "
        + "; ".join(_describe(a) for a in garbage),
    ))
    rows.append(squat(fake_private))
    from esem.attack import a5_files  # A5 through the filesystem (imports this module)

    rows.extend(r for r in a5_files.run(target) if r.backend != "legacy")
    rows.append(Outcome(
        LABEL, "legacy", "n/a",
        "legacy semaphores have no service and no channel, so no identity to check: any "
        "process of the owning uid that can write /dev/shm/sem.NAME is the semaphore (A1)",
    ))
    rows.extend(r for r in a5_files.run_legacy())
    return rows
