"""Plaintext messages (what travels inside the AEAD layer): dataclasses and codecs.

``struct`` only; nothing a peer sends is ever unpickled or evaluated. Admin listings are
UTF-8 JSON inside a reply (parsed with ``json``, which builds only plain data).
Decoders reject anything that is not exactly one well-formed message (unknown opcode,
out-of-range field, short or trailing bytes) with ``ProtocolError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from esem.core.limits import KEY_MAX_BYTES, KEY_MIN_BYTES, MAX_NAME_BYTES
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.errors import ProtocolError
from esem.protocol.constants import (
    HANDLE_BYTES,
    MAC_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PLAINTEXT,
    MAX_TIMEOUT_NS,
    REPLY_HEADER,
    REQUEST_HEADER,
    RESUME_SECRET_BYTES,
    SESSION_ID_BYTES,
    VERSION,
    MsgFlag,
    Opcode,
    OpenFlag,
)

_REQ = struct.Struct(REQUEST_HEADER)
_REP = struct.Struct(REPLY_HEADER)
_OPEN = struct.Struct(">BHI")  # oflag, mode, value
_WAIT = struct.Struct(">BQ")  # wait mode, timeout ns
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")

# Flag bits as plain ints (HAS_MAC is the only message flag). Not ``~MsgFlag.HAS_MAC``:
# since Python 3.11 inverting an IntFlag complements only within its defined members
# (~HAS_MAC is NONE), so ``flags & ~MsgFlag.HAS_MAC`` is always 0 and unknown bits would
# slip through.
_HAS_MAC = int(MsgFlag.HAS_MAC)
# Wire value -> enum member by dict lookup: calling an Enum class costs about a
# microsecond, and decoding is on every request's path.
_OPCODES = {int(m): m for m in Opcode}
_STATUSES = {int(m): m for m in Status}
_WAIT_MODES = {int(m): m for m in WaitMode}
_KNOWN_OPEN_FLAGS = int(OpenFlag.CREAT | OpenFlag.EXCL | OpenFlag.ROBUST | OpenFlag.FOREIGN)

# Opcodes whose request names a semaphore by handle (16-byte token first in the payload).
HANDLE_OPS = frozenset(
    {Opcode.CLOSE, Opcode.WAIT, Opcode.POST, Opcode.GETVALUE, Opcode.ATTACH}
)
_PLAIN_HANDLE_OPS = HANDLE_OPS - {Opcode.WAIT}  # payload: exactly the handle
_REPLY_WITH_BODY = frozenset({Opcode.OPEN, Opcode.ATTACH, Opcode.GETVALUE, Opcode.CANCEL,
                              Opcode.LIST, Opcode.STAT, Opcode.SWITCHLESS,
                              Opcode.RECLAIM, Opcode.RESUME})  # more than a header
# OK replies whose payload is one u32 ``value`` (SWITCHLESS: the ring capacity in bytes;
# RECLAIM: the number of units released).
_U32_REPLIES = frozenset({Opcode.GETVALUE, Opcode.CANCEL, Opcode.SWITCHLESS, Opcode.RECLAIM})
# Requests whose payload is exactly one name.
_NAME_OPS = frozenset({Opcode.UNLINK, Opcode.STAT, Opcode.RECLAIM})


# Messages are values: built once, never changed. They are not ``frozen=True`` because a
# frozen dataclass sets each field through ``object.__setattr__``, which made building
# one cost 1.5-2 us instead of 0.4 us, several times per operation on the hot path.
@dataclass(slots=True)
class Request:
    """One client request. Fields an opcode does not use keep their defaults."""

    opcode: Opcode
    req_id: int
    handle: bytes = b""  # CLOSE WAIT POST GETVALUE ATTACH
    name: str = ""  # OPEN UNLINK STAT RECLAIM
    oflag: OpenFlag = OpenFlag.NONE  # OPEN
    mode: int = 0  # OPEN
    value: int = 0  # OPEN
    key: bytes | None = None  # OPEN with CREAT: the key that binds a new semaphore
    wait_mode: WaitMode = WaitMode.BLOCK  # WAIT
    timeout_ns: int = 0  # WAIT with TIMED
    target: int = 0  # CANCEL: the request id of the wait to withdraw
    after: str = ""  # LIST: the cursor, the last name of the previous page ("": the first)
    session: bytes = b""  # RESUME: the id (handshake hash) of the session to resume
    secret: bytes = b""  # RESUME: that session's current resumption secret R
    awaited: tuple[int, ...] = ()  # RESUME: the req_ids whose replies the client awaits


@dataclass(slots=True)
class Reply:
    """The service's answer to request ``req_id``. Payload fields are set only for OK."""

    opcode: Opcode
    req_id: int
    status: Status
    handle: bytes = b""  # OPEN ATTACH
    created: bool = False  # OPEN
    value: int = 0  # GETVALUE; CANCEL: 1 if the wait was still queued; RECLAIM: units;
    # RESUME: last_req_id (u64), the highest request of the session the service executed
    data: bytes = b""  # LIST STAT: UTF-8 JSON
    message: str = ""  # refusals: what was wrong, for a human


class _Reader:
    """Cursor over a message body; every short read is a ProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError("message truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack(self.take(st.size))

    def short_bytes(self, lo: int, hi: int, what: str) -> bytes:
        (n,) = self.unpack(_U8)
        if not lo <= n <= hi:
            raise ProtocolError(f"{what} length {n} outside {lo}..{hi}")
        return self.take(n)

    def name(self) -> str:
        raw = self.short_bytes(2, MAX_NAME_BYTES + 1, "name")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("name is not UTF-8") from exc

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} trailing bytes")


def _short(raw: bytes) -> bytes:
    return _U8.pack(len(raw)) + raw


def _flags(mac: bool) -> int:
    return _HAS_MAC if mac else 0


def _open_message(
    data: bytes, header: struct.Struct, what: str
) -> tuple[tuple[int, ...], bytes, bytes | None]:
    """What requests and replies share: the size limit, the header (whose first three
    fields are version, opcode, flags), and the optional trailing MAC. Returns the header
    fields, exactly the bytes the MAC covers (header included), and the MAC (None
    without one)."""
    size = len(data)
    if size > MAX_PLAINTEXT:
        raise ProtocolError(f"{what} too large")
    if size < header.size:
        raise ProtocolError("message truncated")
    fields = header.unpack_from(data)
    version, _, flags = fields[:3]
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if not flags:
        return fields, data, None
    if flags & ~_HAS_MAC:
        raise ProtocolError(f"unknown flags {flags:#x}")
    if size < header.size + MAC_BYTES:
        raise ProtocolError("message truncated")
    return fields, data[:-MAC_BYTES], data[-MAC_BYTES:]


def encode_request(req: Request, *, mac: bool = False, req_id: int | None = None) -> bytes:
    """Body of ``req`` without its MAC; with ``mac`` the HAS_MAC flag is set, and the
    caller appends the MAC computed over exactly these bytes. ``req_id`` overrides
    ``req.req_id`` (so a caller can reuse one Request template)."""
    head = _REQ.pack(VERSION, req.opcode, _flags(mac), req.req_id if req_id is None else req_id)
    op = req.opcode
    if op is Opcode.OPEN:
        key = req.key or b""
        body = (
            _OPEN.pack(req.oflag, req.mode, req.value)
            + _short(key)
            + _short(req.name.encode("utf-8"))
        )
    elif op is Opcode.WAIT:
        body = req.handle + _WAIT.pack(req.wait_mode, req.timeout_ns)
    elif op in HANDLE_OPS:
        body = req.handle
    elif op in _NAME_OPS:
        body = _short(req.name.encode("utf-8"))
    elif op is Opcode.CANCEL:
        body = _U64.pack(req.target)
    elif op is Opcode.LIST:
        body = _short(req.after.encode("utf-8"))
    elif op is Opcode.RESUME:
        awaited = req.awaited
        if len(req.session) != SESSION_ID_BYTES or len(req.secret) != RESUME_SECRET_BYTES:
            raise ValueError("RESUME needs a 32-byte session id and a 32-byte secret")
        if len(awaited) > 0xFFFF:
            raise ValueError("RESUME lists at most 65535 request ids")
        body = (req.session + req.secret + _U16.pack(len(awaited))
                + struct.pack(f">{len(awaited)}Q", *awaited))
    else:
        body = b""
    return head + body


def decode_request(data: bytes) -> tuple[Request, bytes, bytes | None]:
    """Parse one request body. Returns the request, the bytes its MAC covers, and the MAC
    (None when the request carries none)."""
    (_, opcode, _, req_id), data, mac = _open_message(data, _REQ, "request")
    op = _OPCODES.get(opcode)
    if op is None:
        raise ProtocolError(f"unknown opcode {opcode}")
    if op in _PLAIN_HANDLE_OPS and len(data) == _REQ.size + HANDLE_BYTES:  # the hot path
        return Request(op, req_id, handle=data[_REQ.size :]), data, mac
    r = _Reader(data, _REQ.size)
    req = _decode_request_body(op, req_id, r)
    r.end()
    return req, data, mac


def _decode_request_body(op: Opcode, req_id: int, r: _Reader) -> Request:
    if op is Opcode.OPEN:
        oflag, mode, value = r.unpack(_OPEN)
        if oflag & ~_KNOWN_OPEN_FLAGS:
            raise ProtocolError(f"unknown open flags {oflag:#x}")
        key = r.short_bytes(0, KEY_MAX_BYTES, "key")
        if key and len(key) < KEY_MIN_BYTES:
            raise ProtocolError(f"key length {len(key)} below {KEY_MIN_BYTES}")
        name = r.name()
        return Request(
            op, req_id, name=name, oflag=OpenFlag(oflag), mode=mode, value=value, key=key or None
        )
    if op in HANDLE_OPS:
        handle = r.take(HANDLE_BYTES)
        if op is not Opcode.WAIT:
            return Request(op, req_id, handle=handle)
        wait_mode, timeout_ns = r.unpack(_WAIT)
        wm = _WAIT_MODES.get(wait_mode)
        if wm is None:
            raise ProtocolError(f"unknown wait mode {wait_mode}")
        if timeout_ns > MAX_TIMEOUT_NS or (timeout_ns and wm is not WaitMode.TIMED):
            raise ProtocolError("timeout out of range")
        return Request(op, req_id, handle=handle, wait_mode=wm, timeout_ns=timeout_ns)
    if op in _NAME_OPS:
        return Request(op, req_id, name=r.name())
    if op is Opcode.CANCEL:
        (target,) = r.unpack(_U64)
        return Request(op, req_id, target=target)
    if op is Opcode.RESUME:
        session = r.take(SESSION_ID_BYTES)
        secret = r.take(RESUME_SECRET_BYTES)
        (count,) = r.unpack(_U16)
        # More than RESUME_MAX_AWAITED parses (the service answers EINVAL), so a client
        # that awaits too many learns why instead of losing its connection.
        awaited = struct.unpack(f">{count}Q", r.take(8 * count))
        return Request(op, req_id, session=session, secret=secret, awaited=awaited)
    if op is Opcode.LIST:
        raw = r.short_bytes(0, MAX_NAME_BYTES + 1, "cursor")
        try:
            return Request(op, req_id, after=raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ProtocolError("cursor is not UTF-8") from exc
    return Request(op, req_id)


def encode_reply(rep: Reply, *, mac: bool = False) -> bytes:
    head = _REP.pack(VERSION, rep.opcode, _flags(mac), rep.req_id, rep.status)
    if rep.status is not Status.OK:
        return head + rep.message.encode("utf-8")[:MAX_MESSAGE_BYTES]
    op = rep.opcode
    if op in (Opcode.OPEN, Opcode.ATTACH):
        return head + rep.handle + _U8.pack(rep.created)
    if op in _U32_REPLIES:
        return head + _U32.pack(rep.value)
    if op in (Opcode.LIST, Opcode.STAT):
        return head + rep.data
    if op is Opcode.RESUME:
        return head + _U64.pack(rep.value)
    return head


def decode_reply(data: bytes) -> tuple[Reply, bytes, bytes | None]:
    """Parse one reply body: the reply, the bytes its MAC covers, and the MAC or None."""
    (_, opcode, _, req_id, status), data, mac = _open_message(data, _REP, "reply")
    op, st = _OPCODES.get(opcode), _STATUSES.get(status)
    if op is None or st is None:
        raise ProtocolError(f"unknown opcode {opcode} or status {status}")
    if st is not Status.OK:
        raw = data[_REP.size :]
        if len(raw) > MAX_MESSAGE_BYTES:
            raise ProtocolError("refusal text too long")
        return Reply(op, req_id, st, message=raw.decode("utf-8", "replace")), data, mac
    if len(data) == _REP.size and op not in _REPLY_WITH_BODY:  # the hot path
        return Reply(op, req_id, st), data, mac
    r = _Reader(data, _REP.size)
    rep = Reply(op, req_id, st)
    if op in (Opcode.OPEN, Opcode.ATTACH):
        handle = r.take(HANDLE_BYTES)
        (created,) = r.unpack(_U8)
        if created > 1:
            raise ProtocolError("created flag out of range")
        rep = Reply(op, req_id, st, handle=handle, created=bool(created))
    elif op in _U32_REPLIES:
        (value,) = r.unpack(_U32)
        rep = Reply(op, req_id, st, value=value)
    elif op in (Opcode.LIST, Opcode.STAT):
        rep = Reply(op, req_id, st, data=r.take(len(r.data) - r.pos))
    elif op is Opcode.RESUME:
        (value,) = r.unpack(_U64)
        rep = Reply(op, req_id, st, value=value)
    r.end()
    return rep, data, mac
