"""A session's replay window: the final replies of its last answered requests.

After a RESUME the service re-sends, byte-identical, the replies a client still awaits
and may have lost with its connection (PROTOCOL.md 16.3). The window is bounded in
replies (``REPLAY_WINDOW``) and in bytes (``REPLAY_WINDOW_BYTES``), oldest dropped first,
so what a session can make the service hold does not grow with its history. Pure: no
I/O, a value the service keeps per session and restores from its journal.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

REPLAY_WINDOW = 256  # replies (PROTOCOL.md 16.3)
REPLAY_WINDOW_BYTES = 64 * 1024  # bytes of reply plaintext, over the whole window


class ReplayWindow:
    """req_id -> reply plaintext (MAC included), in the order the replies were final."""

    __slots__ = ("_bytes", "_replies", "limit", "limit_bytes")

    def __init__(self, limit: int = REPLAY_WINDOW, limit_bytes: int = REPLAY_WINDOW_BYTES) -> None:
        if limit < 1 or limit_bytes < 1:
            raise ValueError("a replay window holds at least one reply")
        self.limit = limit
        self.limit_bytes = limit_bytes
        self._replies: OrderedDict[int, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._replies)

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._replies

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(self._replies.items())

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._bytes

    def get(self, req_id: int) -> bytes | None:
        return self._replies.get(req_id)

    def add(self, req_id: int, body: bytes) -> None:
        """Keep ``body`` as the final reply to ``req_id`` (each request has one final
        reply: adding a second for the same id is a bug), then drop the oldest replies
        while either bound is passed. A reply larger than the byte bound alone is kept
        until the next one arrives: the last reply is always there."""
        if req_id in self._replies:
            raise ValueError(f"request {req_id} already has its final reply")
        self._replies[req_id] = body
        self._bytes += len(body)
        while len(self._replies) > 1 and (
            len(self._replies) > self.limit or self._bytes > self.limit_bytes
        ):
            _, old = self._replies.popitem(last=False)
            self._bytes -= len(old)
