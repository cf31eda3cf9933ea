"""The vault's wire protocol: length-prefixed frames over TLS, JSON header, raw body.

A frame is ``MAGIC (4 bytes) | header length (u32) | body length (u32)``, big-endian,
then a UTF-8 JSON object (the header: ``op``, ``name``, ... or ``ok``, ``error``), then
the body (a file's bytes, or an ``ls`` listing as JSON). Both lengths are checked against
named limits *before* anything is read or allocated, so a peer cannot make the other
side buffer more than ``MAX_HEADER_BYTES + MAX_BODY_BYTES``. Nothing is ever unpickled.

Requests, one frame each: ``auth {user, password}`` (first, once per connection),
``put {name} + body``, ``get {name}``, ``ls {}``, ``rm {name}``. Replies: ``{ok: true,
...} [+ body]`` or ``{ok: false, error: CODE, message}``.
"""

from __future__ import annotations

import json
import socket
import struct
import unicodedata
from typing import Any

from esem.vault.errors import BadName, BadRequest, TooLarge
from esem.vault.limits import MAX_HEADER_BYTES, MAX_NAME_BYTES

MAGIC = b"EVT1"  # esem vault, protocol version 1
PREFIX = struct.Struct("!4sII")  # magic, header bytes, body bytes
OPS = ("auth", "put", "get", "ls", "rm")

Header = dict[str, Any]


class Closed(Exception):
    """The peer closed the connection; ``partial`` when it did so inside a frame (a
    client that hung up mid-upload)."""

    def __init__(self, partial: bool) -> None:
        super().__init__("connection closed inside a frame" if partial else "connection closed")
        self.partial = partial


def recv_exact(sock: socket.socket, n: int, *, partial: bool = True) -> bytes:
    """Exactly ``n`` bytes, or ``Closed``. ``partial`` says whether an EOF right here
    is inside a frame (True) or between frames (False, only for the first byte)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise Closed(partial or got > 0)
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket, max_body: int) -> tuple[Header, bytes] | None:
    """The next frame, or None when the peer closed cleanly between frames.

    Raises ``BadRequest`` for bytes that are not a frame, ``TooLarge`` when the declared
    body exceeds ``max_body`` (nothing of the body has been read then: the connection
    must be closed), and ``Closed`` when the peer hangs up inside the frame."""
    try:
        prefix = recv_exact(sock, PREFIX.size, partial=False)
    except Closed as exc:
        if exc.partial:
            raise
        return None
    magic, header_len, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise BadRequest(f"not an esem vault frame (magic {magic!r}, expected {MAGIC!r})")
    if header_len > MAX_HEADER_BYTES:
        raise BadRequest(f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if body_len > max_body:
        raise TooLarge(f"body of {body_len} bytes exceeds the limit of {max_body} bytes")
    raw = recv_exact(sock, header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("header is not a JSON object")
    return header, recv_exact(sock, body_len) if body_len else b""


def encode_frame(header: Header, body: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise BadRequest(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return PREFIX.pack(MAGIC, len(raw), len(body)) + raw + body


def write_frame(sock: socket.socket, header: Header, body: bytes = b"") -> None:
    sock.sendall(encode_frame(header, body))


def str_field(header: Header, key: str) -> str:
    value = header.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"request field {key!r} must be a string")
    return value


def check_name(name: object) -> str:
    """A file name: 1..MAX_NAME_BYTES bytes of UTF-8, no control characters (they would
    corrupt listings on a terminal), no leading or trailing whitespace. Any other
    character, ``/`` included, is fine: names are keys in the tree, never paths."""
    if not isinstance(name, str):
        raise BadName(f"a file name must be a string, not {type(name).__name__}")
    if not name:
        raise BadName("a file name must not be empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise BadName(f"file name is {size} bytes; the limit is {MAX_NAME_BYTES}")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise BadName(f"file name {name!r} contains control characters")
    if name != name.strip():
        raise BadName(f"file name {name!r} has leading or trailing whitespace")
    return name
