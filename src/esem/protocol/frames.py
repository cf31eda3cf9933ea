"""Length-prefixed framing: ``u32 big-endian length | body``, 1 <= length <= MAX_FRAME_BODY.

A length outside that range is a ``ProtocolError`` as soon as its four bytes arrive, so a
hostile peer can never make the other end buffer more than one maximal frame.
"""

from __future__ import annotations

import struct

from esem.errors import ProtocolError
from esem.protocol.constants import LENGTH_BYTES, MAX_FRAME_BODY

_LEN = struct.Struct(">I")


def encode_frame(body: bytes) -> bytes:
    if not 1 <= len(body) <= MAX_FRAME_BODY:
        raise ValueError(f"frame body of {len(body)} bytes outside 1..{MAX_FRAME_BODY}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Accumulates bytes and yields whole frame bodies."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __repr__(self) -> str:
        return f"<FrameDecoder buffered={len(self._buf)}>"

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame body now complete, in order."""
        buf = self._buf
        if not buf and len(data) >= LENGTH_BYTES:
            # The common case, one whole frame per read: no copy through the buffer.
            (n,) = _LEN.unpack_from(data)
            if len(data) == LENGTH_BYTES + n and 1 <= n <= MAX_FRAME_BODY:
                return [data[LENGTH_BYTES:]]
        buf += data
        frames: list[bytes] = []
        while len(buf) >= LENGTH_BYTES:
            (n,) = _LEN.unpack_from(buf)
            if not 1 <= n <= MAX_FRAME_BODY:
                raise ProtocolError(f"frame length {n} outside 1..{MAX_FRAME_BODY}")
            end = LENGTH_BYTES + n
            if len(buf) < end:
                break
            frames.append(bytes(buf[LENGTH_BYTES:end]))
            del buf[:end]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def data_to_keep(self) -> bytes:
        """The partial frame held, handed over (to a native decoder) and forgotten."""
        out = bytes(self._buf)
        self._buf.clear()
        return out
