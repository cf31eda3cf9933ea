"""Sans-I/O protocol sessions: bytes in, typed events out, bytes to send.

A session moves through the states below; every (state, input) pair not in the
transition table is a protocol error, after which the session is CLOSED for good and the
I/O shell must drop the connection::

    client: START --start()--> AWAIT_WELCOME --WELCOME--> OPEN --(error)--> CLOSED
                                             --REFUSED--> CLOSED
    service: AWAIT_HELLO --HELLO--> HELLO_RECEIVED --accept()--> OPEN --(error)--> CLOSED
             AWAIT_HELLO, HELLO_RECEIVED --refuse()--> CLOSED

The service side is driven one frame at a time (``feed``, then ``next_event`` until it
returns None), so the I/O shell decides how much of a peer's batch it executes now and
can stop (its output is piling up, its turn is over) without losing what was read. A
valid HELLO stops the session in HELLO_RECEIVED until the shell has decided whether to
admit it (``accept``) or not (``refuse``): a connection counts against a quota only
once its handshake is complete.

In OPEN every frame is an AEAD transport message. The client numbers its requests with
strictly increasing ids and the service rejects any id that does not increase, so the id
is a per-session sequence number that key-binding MACs can bind. Replies may come in any
order (a blocked wait answers late) but each pending id is answered exactly once, by a
reply with the request's opcode.

Once the handshake is over, the service's end hands its two transport directions to the
native codec (``esem._native_core.ServerCodec``, esem-proto through PyO3) when it is
built: it splits, decrypts and decodes a whole read in one call and seals replies into
one output buffer. ``ESEM_SERVICE_CODEC=python`` (or ``codec="python"``) keeps the
pure-Python reference below instead; both behave identically, errors included (a test).
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from esem.core.status import CoreError, Status
from esem.core.table import WaitMode
from esem.errors import EsemError, IntegrityError, ProtocolError, error_for
from esem.protocol.constants import (
    MAX_MESSAGE_BYTES,
    MAX_PLAINTEXT,
    RESUME_SECRET_BYTES,
    VERSION,
    Direction,
    FrameKind,
    Opcode,
    OpenFlag,
)
from esem.protocol.crypto import (
    Initiator,
    Responder,
    Transport,
    keybind_mac,
    resume_verifier,
    verify_keybind_mac,
)
from esem.protocol.frames import FrameDecoder, encode_frame
from esem.protocol.messages import (
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

_HS = struct.Struct(">BB")  # version, kind
_REFUSAL = struct.Struct(">BBH")  # version, kind, status

if TYPE_CHECKING:
    from esem._native_core import ServerCodec

try:
    from esem._native_core import ServerCodec as _ServerCodec
except ImportError:  # built without Rust (setuptools-rust's optional extension)
    _ServerCodec = None  # type: ignore[assignment,misc]

CODEC_ENV: Final = "ESEM_SERVICE_CODEC"
CODECS: Final = ("native", "python")


def native_or_python(var: str, raw: str, available: bool, unavailable: str) -> str:
    """The service's choice between a native part and its Python reference, as the
    setting ``var`` spells it (``raw``): empty means native when ``available``, else
    python; anything but the two names is a ValueError, native when not ``available``
    a RuntimeError saying ``unavailable``."""
    raw = raw.strip().lower()
    if raw and raw not in CODECS:
        raise ValueError(f"{var}={raw!r}: expected native or python")
    if raw == "native" and not available:
        raise RuntimeError(f"{var}=native {unavailable}")
    return raw or ("native" if available else "python")


def service_codec(choice: str | None = None) -> str:
    """``"native"`` or ``"python"``: ``choice``, else ``ESEM_SERVICE_CODEC``, else the
    native codec when it is built. Asking for ``native`` without it is a RuntimeError."""
    return native_or_python(CODEC_ENV, os.environ.get(CODEC_ENV, "") if choice is None
                            else choice, _ServerCodec is not None,
                            "needs esem._native_core, which is not built")


# Wire value -> enum member by dict lookup (calling an Enum class costs a microsecond).
_OPCODES: dict[int, Opcode] = {int(m): m for m in Opcode}
_WAIT_MODES: dict[int, WaitMode] = {int(m): m for m in WaitMode}
_HANDLE_ONLY = frozenset(int(o) for o in (Opcode.CLOSE, Opcode.POST, Opcode.GETVALUE,
                                         Opcode.ATTACH))
_NAME_ONLY = frozenset(int(o) for o in (Opcode.UNLINK, Opcode.STAT, Opcode.RECLAIM))
_OP_WAIT, _OP_OPEN, _OP_CANCEL = int(Opcode.WAIT), int(Opcode.OPEN), int(Opcode.CANCEL)
_OP_LIST, _OP_RESUME = int(Opcode.LIST), int(Opcode.RESUME)


def _native_request(op: int, req_id: int, fields: Any) -> Request:
    """The ``Request`` of one tuple from ``ServerCodec.open`` (its fields by opcode),
    exactly what ``decode_request`` returns for the same bytes."""
    opcode = _OPCODES[op]
    if op in _HANDLE_ONLY:
        return Request(opcode, req_id, handle=fields)
    if op == _OP_WAIT:
        handle, mode, timeout_ns = fields
        return Request(opcode, req_id, handle=handle, wait_mode=_WAIT_MODES[mode],
                       timeout_ns=timeout_ns)
    if op == _OP_OPEN:
        name, oflag, mode, value, key = fields
        return Request(opcode, req_id, name=name, oflag=OpenFlag(oflag), mode=mode,
                       value=value, key=key)
    if op in _NAME_ONLY:
        return Request(opcode, req_id, name=fields)
    if op == _OP_CANCEL:
        return Request(opcode, req_id, target=fields)
    if op == _OP_LIST:
        return Request(opcode, req_id, after=fields)
    if op == _OP_RESUME:
        session, secret, awaited = fields
        return Request(opcode, req_id, session=session, secret=secret, awaited=awaited)
    return Request(opcode, req_id)


class State(Enum):
    START = "start"
    AWAIT_HELLO = "await-hello"
    HELLO_RECEIVED = "hello-received"  # a valid HELLO, waiting for accept() or refuse()
    AWAIT_WELCOME = "await-welcome"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)  # a value; not frozen for speed, as messages.Request
class RequestIn:
    """A decrypted, well-formed request. ``signed``/``mac`` are what its key-binding MAC
    covers and the MAC itself (None if it carried none)."""

    request: Request
    signed: bytes
    mac: bytes | None


@dataclass(slots=True)
class HelloIn:
    """A valid HELLO arrived: the shell must now ``accept()`` or ``refuse()``."""


def _fits(plaintext: bytes) -> bytes:
    """Refuse an oversized message *before* it is encrypted: encrypting advances the
    direction's nonce counter, so a message encrypted and then refused by
    ``encode_frame`` would leave the peer one counter behind and fail every later
    frame of the session."""
    if len(plaintext) > MAX_PLAINTEXT:
        raise ValueError(f"message of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
    return plaintext


def _handshake_frame(kind: FrameKind, payload: bytes) -> bytes:
    return encode_frame(_HS.pack(VERSION, kind) + payload)


def _split_handshake(body: bytes) -> tuple[FrameKind, bytes]:
    if len(body) < _HS.size:
        raise ProtocolError("handshake frame truncated")
    version, kind = _HS.unpack_from(body)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    try:
        return FrameKind(kind), body[_HS.size :]
    except ValueError:
        raise ProtocolError(f"unknown handshake frame kind {kind}") from None


def seal_reply(reply: Reply, binding_id: bytes, mac_key: bytes | None = None) -> bytes:
    """The plaintext body of ``reply`` (with its key-binding MAC under ``mac_key``, bound
    to the session id ``binding_id``), ready to encrypt: what the service keeps in a
    session's replay window and re-sends byte-identical after a RESUME."""
    body = encode_reply(reply, mac=mac_key is not None)
    if mac_key is not None:
        body += keybind_mac(mac_key, binding_id, Direction.TO_CLIENT, body)
    return _fits(body)


class _Session:
    _transport: Transport | None

    def __init__(self, state: State) -> None:
        self.state = state
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._transport = None
        # The id key-binding MACs bind: this handshake's hash, or, once this connection
        # has resumed a session (PROTOCOL.md 16), the hash of the handshake that created
        # that session, kept for its whole life.
        self._binding: bytes | None = None

    @property
    def session_id(self) -> bytes:
        """The handshake hash of this connection."""
        if self._transport is None:
            raise RuntimeError("session not established")
        return self._transport.session_id

    @property
    def binding_id(self) -> bytes:
        """The id of the session this connection carries (``session_id`` unless it
        resumed another): what key-binding MACs bind."""
        if self._binding is not None:
            return self._binding
        return self.session_id

    @property
    def buffered(self) -> int:
        """Bytes queued for the peer and not yet taken by ``data_to_send``."""
        return len(self._out)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _frames(self, data: bytes) -> list[bytes]:
        if self.state is State.CLOSED:
            raise ProtocolError("session is closed")
        try:
            return self._decoder.feed(data)
        except EsemError:
            self.state = State.CLOSED
            raise

    def _fail(self, exc: EsemError) -> EsemError:
        self.state = State.CLOSED
        return exc


class ServerSession(_Session):
    """The service's end of one connection."""

    def __init__(self, static_private: bytes, *, codec: str | None = None) -> None:
        super().__init__(State.AWAIT_HELLO)
        # "native" or "python" (``service_codec``): who does the transport once OPEN.
        self.codec = service_codec(codec)
        self._native: ServerCodec | None = None
        # The native codec decodes a read's frames at once; a frame that failed waits
        # here until the requests before it have been processed, then is raised.
        self._error: EsemError | None = None
        self._responder: Responder | None = Responder(static_private)
        self._welcome: bytes | None = None  # NK message 2, until accept()
        # V = BLAKE2s(R) of the resumption secret R sent in this connection's WELCOME; R
        # itself is dropped as soon as the WELCOME is sealed.
        self.verifier: bytes | None = None
        self._last_req_id = 0
        self._first_request = True  # RESUME is valid only as the first request
        self._resume_req_id = 0  # the RESUME's id, once this connection resumed
        # Frame bodies read but not yet turned into events: at most one read's worth,
        # because the shell stops reading while any are left.
        self._frames_in: deque[Any] = deque()  # bodies; native: ServerCodec.open tuples
        self._transitions: dict[State, Callable[[bytes], RequestIn | HelloIn]] = {
            State.AWAIT_HELLO: self._on_hello,
            State.OPEN: self._on_request,
        }

    def __repr__(self) -> str:
        return (f"<ServerSession {self.state.value} last_req={self._last_req_id} "
                f"backlog={self.backlog}>")

    @property
    def backlog(self) -> int:
        """Frames received and not yet processed by ``next_event``."""
        return len(self._frames_in) + (self._error is not None)

    @property
    def buffered(self) -> int:
        native = self._native
        return len(self._out) + (native.buffered if native is not None else 0)

    def data_to_send(self) -> bytes:
        native = self._native
        if native is None:
            return super().data_to_send()
        if self._out:  # the WELCOME, queued before the codec took over
            out = bytes(self._out) + native.take()
            self._out.clear()
            return out
        return native.take()

    def feed(self, data: bytes) -> None:
        """Add bytes from the peer; whole frames wait for ``next_event``. A frame length
        of 0 or above the limit raises ``ProtocolError`` at once (and closes)."""
        native = self._native
        if native is None:
            frames = self._frames(data)
            if frames:
                self._frames_in.extend(frames)
            return
        if self.state is State.CLOSED:
            raise ProtocolError("session is closed")
        try:
            events, error = native.open(data)
        except EsemError:
            self.state = State.CLOSED
            self._frames_in.clear()
            raise
        if events:
            self._frames_in.extend(events)
        if error is not None:
            self._error = error

    def next_event(self) -> RequestIn | HelloIn | None:
        """Process the next received frame: a request, a ``HelloIn``, or None when no
        whole frame is waiting (or the session waits for ``accept``). Raises
        ``ProtocolError``/``IntegrityError`` (and closes) on anything that is not the
        protocol; the frames after it are never processed."""
        if self._native is not None and self.state is State.OPEN:
            return self._next_native()
        if not self._frames_in or self.state is State.HELLO_RECEIVED:
            return None
        body = self._frames_in.popleft()
        handler = self._transitions.get(self.state)
        if handler is None:
            self._frames_in.clear()
            raise self._fail(ProtocolError(f"no frame expected in state {self.state.value}"))
        try:
            return handler(body)
        except EsemError:
            self.state = State.CLOSED
            self._frames_in.clear()
            raise

    def _next_native(self) -> RequestIn | None:
        if self._frames_in:
            op, req_id, signed, mac, fields = self._frames_in.popleft()
            try:
                return self._admit(_native_request(op, req_id, fields), signed, mac)
            except EsemError:
                self.state = State.CLOSED
                self._frames_in.clear()
                self._error = None
                raise
        error = self._error
        if error is None:
            return None
        self._error = None
        self.state = State.CLOSED
        raise error

    def receive_data(self, data: bytes) -> list[RequestIn]:
        """Feed bytes and process every whole frame, accepting a HELLO at once (for
        in-memory pairs and tests; the service drives ``feed``/``next_event``). Raises
        ``ProtocolError``/``IntegrityError`` (and closes the session) on anything that is
        not the protocol."""
        self.feed(data)
        events: list[RequestIn] = []
        while True:
            event = self.next_event()
            if event is None:
                return events
            if isinstance(event, HelloIn):
                self.accept()
            else:
                events.append(event)

    def accept(self) -> None:
        """Admit the session whose HELLO arrived: queue the WELCOME."""
        if self.state is not State.HELLO_RECEIVED or self._welcome is None:
            raise RuntimeError(f"no HELLO to accept in state {self.state.value}")
        self._out += _handshake_frame(FrameKind.WELCOME, self._welcome)
        self._welcome = None
        self.state = State.OPEN
        if self.codec == "native" and self._transport is not None:
            assert _ServerCodec is not None
            (rx_key, rx_n), (tx_key, tx_n) = self._transport.directions()
            self._native = _ServerCodec(rx_key, rx_n, tx_key, tx_n)
            # Whatever the peer sent after its HELLO goes through the codec, in order.
            rest = b"".join(encode_frame(body) for body in self._frames_in)
            rest += self._decoder.data_to_keep()
            self._frames_in.clear()
            if rest:
                self.feed(rest)

    def refuse(self, status: Status, text: str) -> None:
        """Refuse the connection before or instead of the handshake (quota, version)."""
        raw = text.encode("utf-8")[:MAX_MESSAGE_BYTES]
        self._out += encode_frame(_REFUSAL.pack(VERSION, FrameKind.REFUSED, status) + raw)
        self.state = State.CLOSED
        self._welcome = None
        self._transport = None
        self._frames_in.clear()

    def _on_hello(self, body: bytes) -> HelloIn:
        kind, payload = _split_handshake(body)
        if kind is not FrameKind.HELLO or self._responder is None:
            raise ProtocolError("expected HELLO")
        secret = os.urandom(RESUME_SECRET_BYTES)
        self._welcome, self._transport = self._responder.respond(payload, secret)
        self.verifier = resume_verifier(secret)
        del secret
        self._responder = None
        self.state = State.HELLO_RECEIVED
        return HelloIn()

    def _on_request(self, body: bytes) -> RequestIn:
        assert self._transport is not None
        plaintext = self._transport.decrypt(body)
        req, signed, mac = decode_request(plaintext)
        return self._admit(req, signed, mac)

    def _admit(self, req: Request, signed: bytes, mac: bytes | None) -> RequestIn:
        """The session's rules on a well-formed request (ids increase; RESUME only
        first and without a MAC, END without one)."""
        if req.req_id <= self._last_req_id or req.req_id == self._resume_req_id:
            raise ProtocolError(f"request id {req.req_id} does not increase")
        if req.opcode is Opcode.RESUME:
            if not self._first_request:
                raise ProtocolError("RESUME is valid only as the first request")
            if mac is not None:
                raise ProtocolError("RESUME carries no MAC")
        elif req.opcode is Opcode.END and mac is not None:
            raise ProtocolError("END carries no MAC")
        self._first_request = False
        self._last_req_id = req.req_id
        return RequestIn(req, signed, mac)

    def adopt(self, binding_id: bytes, last_req_id: int, resume_req_id: int) -> None:
        """This connection now carries a resumed session (PROTOCOL.md 16): its MACs bind
        ``binding_id``, and the requests the client re-sends (ids above ``last_req_id``,
        below the RESUME's) and its new ones (above the RESUME's) are accepted in
        increasing order; the RESUME's own id is never valid again."""
        if self.state is not State.OPEN:
            raise RuntimeError(f"cannot resume in state {self.state.value}")
        self._binding = binding_id
        self._last_req_id = last_req_id
        self._resume_req_id = resume_req_id

    def authenticator(self, event: RequestIn) -> Callable[[bytes], None]:
        """The core's proof-of-key check for this request: raises
        ``CoreError(EKEYREJECTED)`` unless its MAC verifies under the given key."""
        session_id = self.binding_id

        def auth(key: bytes) -> None:
            try:
                verify_keybind_mac(key, session_id, Direction.TO_SERVICE, event.signed, event.mac)
            except IntegrityError:
                raise CoreError(
                    Status.EKEYREJECTED, "key-bound semaphore: missing or invalid key MAC"
                ) from None

        return auth

    def send_reply(self, reply: Reply, *, mac_key: bytes | None = None) -> bytes:
        """Queue ``reply``; with ``mac_key`` it carries the key-binding MAC under it.
        Returns its plaintext body (for the replay window)."""
        if self.state is not State.OPEN or self._transport is None:
            raise RuntimeError(f"cannot reply in state {self.state.value}")
        body = seal_reply(reply, self.binding_id, mac_key)
        self._encrypt_out(body)
        return body

    def send_status(self, opcode: Opcode, req_id: int, status: Status, value: int = 0,
                    message: str = "", *, mac_key: bytes | None = None) -> bytes:
        """``send_reply`` of a reply with no payload or a u32 ``value`` (OK), or of a
        refusal with ``message``, without building a ``Reply`` when the native codec
        encodes it. Returns its plaintext body."""
        native = self._native
        if native is None or self.state is not State.OPEN:
            return self.send_reply(Reply(opcode, req_id, status, value=value, message=message),
                                   mac_key=mac_key)
        return native.seal_reply(opcode, req_id, status, value, message, mac_key,
                                 self.binding_id)

    def send_body(self, body: bytes) -> None:
        """Queue a reply body made by ``seal_reply`` (a late reply, or one re-sent from
        the replay window after a RESUME)."""
        if self.state is not State.OPEN or self._transport is None:
            raise RuntimeError(f"cannot reply in state {self.state.value}")
        self._encrypt_out(_fits(body))

    def _encrypt_out(self, body: bytes) -> None:
        """Encrypt a reply body and queue its frame: through the native codec once it
        has the transport, else here."""
        if self._native is not None:
            self._native.seal(body)
        else:
            assert self._transport is not None
            self._out += encode_frame(self._transport.encrypt(body))


@dataclass(slots=True)
class _Pending:
    opcode: Opcode
    key: bytes | None  # the request carried a MAC under this key
    body: bytes = b""  # its plaintext (MAC included), to re-send after a RESUME


@dataclass(slots=True)
class _Resuming:
    old: ClientSession  # the session being resumed
    req_id: int  # the RESUME's request id


class ClientSession(_Session):
    """The client's end: pins the service's static public key."""

    def __init__(self, service_public: bytes) -> None:
        super().__init__(State.START)
        self._initiator: Initiator | None = Initiator(service_public)
        self._next_req_id = 1
        self._pending: dict[int, _Pending] = {}
        self.resumption_secret: bytes | None = None  # R, from this connection's WELCOME
        self._resuming: _Resuming | None = None
        # After a successful RESUME: the session's last executed request id (the
        # awaited requests above it must be re-sent: ``resend``); None otherwise.
        self.resumed_last: int | None = None

    def __repr__(self) -> str:
        return f"<ClientSession {self.state.value} pending={len(self._pending)}>"

    @property
    def established(self) -> bool:
        return self.state is State.OPEN

    @property
    def pending(self) -> int:
        return len(self._pending)

    def is_pending(self, req_id: int) -> bool:
        """True until the reply to ``req_id`` has come out of ``receive_data``."""
        return req_id in self._pending

    def start(self) -> bytes:
        """The HELLO frame that opens the handshake."""
        if self.state is not State.START or self._initiator is None:
            raise RuntimeError("handshake already started")
        self.state = State.AWAIT_WELCOME
        return _handshake_frame(FrameKind.HELLO, self._initiator.hello())

    def next_request_id(self) -> int:
        req_id = self._next_req_id
        self._next_req_id += 1
        return req_id

    def send_request(
        self, req: Request, *, key: bytes | None = None, req_id: int | None = None
    ) -> bytes:
        """Encrypt ``req`` into a frame, under ``req_id`` (default ``req.req_id``; from
        ``next_request_id``, used once); with ``key`` it carries the key-binding MAC and
        its reply must carry one back."""
        if self.state is not State.OPEN or self._transport is None:
            raise RuntimeError(f"cannot send in state {self.state.value}")
        if req_id is None:
            req_id = req.req_id
        if req_id in self._pending:
            raise RuntimeError(f"request id {req_id} is in flight")
        body = encode_request(req, mac=key is not None, req_id=req_id)
        if key is not None:
            body += keybind_mac(key, self.binding_id, Direction.TO_SERVICE, body)
        frame = encode_frame(self._transport.encrypt(_fits(body)))
        self._pending[req_id] = _Pending(req.opcode, key, body)
        return frame

    def resume(self, old: ClientSession) -> bytes:
        """The RESUME frame (first request on this new connection) asking the service to
        carry on ``old``, a session whose connection was lost: it lists every request
        ``old`` still awaits. On its OK reply (out of ``receive_data``) this session
        takes over ``old``'s id, numbering and pending requests; then ``resend``."""
        if self.state is not State.OPEN or self._transport is None:
            raise RuntimeError(f"cannot send in state {self.state.value}")
        if self._pending or self._next_req_id != 1 or self.resumed_last is not None:
            raise RuntimeError("RESUME must be the first request of a connection")
        if old.resumption_secret is None:
            raise RuntimeError("the old session never completed its handshake")
        req_id = old.next_request_id()
        # Should the RESUME fail, this fresh session goes on numbering above it.
        self._next_req_id = req_id + 1
        req = Request(Opcode.RESUME, req_id, session=old.binding_id,
                      secret=old.resumption_secret, awaited=tuple(sorted(old._pending)))
        body = encode_request(req)
        frame = encode_frame(self._transport.encrypt(_fits(body)))
        self._pending[req_id] = _Pending(Opcode.RESUME, None, body)
        self._resuming = _Resuming(old, req_id)
        return frame

    def resend(self) -> bytes:
        """After a successful RESUME: the frames that re-send, in order and with their
        original ids and plaintext, every awaited request the service had not executed
        (id above ``resumed_last``)."""
        if self.resumed_last is None or self._transport is None:
            raise RuntimeError("no successful RESUME to re-send after")
        out = bytearray()
        for req_id in sorted(self._pending):
            if req_id > self.resumed_last:
                pending = self._pending[req_id]
                out += encode_frame(self._transport.encrypt(pending.body))
        return bytes(out)

    def receive_data(self, data: bytes) -> list[Reply]:
        """Feed bytes from the service; returns verified replies. Any frame that fails
        authentication, parsing or matching a pending request raises ``IntegrityError``
        (``ProtocolError`` is one) and closes the session; a refusal at the handshake
        raises the refusal's error."""
        replies: list[Reply] = []
        for body in self._frames(data):
            try:
                if self.state is State.AWAIT_WELCOME:
                    self._on_welcome(body)
                elif self.state is State.OPEN:
                    replies.append(self._on_reply(body))
                else:
                    raise ProtocolError(f"no frame expected in state {self.state.value}")
            except EsemError:
                self.state = State.CLOSED
                raise
        return replies

    def _on_welcome(self, body: bytes) -> None:
        kind, payload = _split_handshake(body)
        if kind is FrameKind.REFUSED:
            if len(payload) < 2:
                raise ProtocolError("refusal truncated")
            try:
                status = Status(int.from_bytes(payload[:2], "big"))
            except ValueError:
                raise ProtocolError("refusal with unknown status") from None
            # A refusal that claims OK is not the protocol; error_for(OK) would raise a
            # bare EsemError outside the ProtocolError/mapped-refusal contract.
            if status is Status.OK:
                raise ProtocolError("refusal with status OK")
            text = payload[2:].decode("utf-8", "replace")
            raise error_for(status, f"service refused the session: {text}")
        if kind is not FrameKind.WELCOME or self._initiator is None:
            raise ProtocolError("expected WELCOME")
        self._transport = self._initiator.finish(payload)
        self.resumption_secret = self._initiator.secret
        self._initiator = None
        self.state = State.OPEN

    def _on_reply(self, body: bytes) -> Reply:
        assert self._transport is not None
        reply, signed, mac = decode_reply(self._transport.decrypt(body))
        pending = self._pending.pop(reply.req_id, None)
        # ESTALE (a reply lost across a restart) comes with opcode RESUME, whatever the
        # request was: the service no longer knows it (PROTOCOL.md 16.2).
        stale = (reply.status is Status.ESTALE and reply.opcode is Opcode.RESUME
                 and self.resumed_last is not None and mac is None)
        if pending is None or (pending.opcode is not reply.opcode and not stale):
            raise ProtocolError(f"reply {reply.req_id} answers no pending request")
        resuming = self._resuming
        if resuming is not None and reply.req_id == resuming.req_id:
            self._resuming = None
            if reply.status is Status.OK:
                self._adopt(resuming.old, reply.value)
            return reply
        if pending.key is None:
            if mac is not None:
                raise ProtocolError("MAC on a reply to a request without one")
        elif mac is not None or reply.status is Status.OK:
            # Never accept a success on a key-bound semaphore without the key's MAC.
            verify_keybind_mac(pending.key, self.binding_id, Direction.TO_CLIENT, signed, mac)
        return reply

    def _adopt(self, old: ClientSession, last_req_id: int) -> None:
        self._binding = old.binding_id
        self._next_req_id = max(self._next_req_id, old._next_req_id)
        self._pending.update(old._pending)
        old._pending = {}
        self.resumed_last = last_req_id
