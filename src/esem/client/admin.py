"""Read-only views of the service for operators: ``esem ls`` and ``esem stat``.

LIST is paged by a cursor (the last name received), so each request costs the service
one page whatever the size of the table, and a listing taken while names come and go
never repeats or skips a name that stayed. A key-bound semaphore shows only its public
fields unless ``stat_semaphore`` is given its key: the STAT is then MAC'd under it and
its reply must prove the key back (PROTOCOL.md 8).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from esem.client.blocking import Client
from esem.core.limits import KEY_MAX_BYTES, KEY_MIN_BYTES, check_name
from esem.core.status import CoreError
from esem.errors import ProtocolError
from esem.protocol.constants import Opcode
from esem.protocol.messages import Request


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ProtocolError("service sent malformed JSON") from exc


def list_pages(client: Client) -> Iterator[list[dict[str, Any]]]:
    """Yield each LIST page's entries in name order, asking for the next page only
    when the previous one has been consumed."""
    after = ""
    while True:
        page = _json(client.call(Request(Opcode.LIST, 0, after=after)).data)
        if not isinstance(page, dict) or not isinstance(page.get("entries"), list):
            raise ProtocolError("service sent a malformed LIST page")
        entries: list[dict[str, Any]] = page["entries"]
        yield entries
        if not page.get("more") or not entries:
            return
        last = entries[-1].get("name") if isinstance(entries[-1], dict) else None
        if not isinstance(last, str) or last <= after:
            raise ProtocolError("LIST cursor did not advance")
        after = last


def list_semaphores(client: Client) -> list[dict[str, Any]]:
    """Every named semaphore of the service, paged through LIST."""
    return [entry for page in list_pages(client) for entry in page]


def stat_semaphore(client: Client, name: str, *, key: bytes | None = None) -> dict[str, Any]:
    """STAT one semaphore. For a key-bound one, ``key`` (its 16..32-byte key) shows its
    count, holders and queue; without it only the public fields are set (the rest are
    None). A wrong key raises ``KeyRejected``; a key for a semaphore that is not
    key-bound raises it too."""
    if isinstance(name, str):
        try:
            check_name(name)
        except CoreError as exc:
            raise ValueError(exc.message) from None
    else:
        raise TypeError(f"semaphore name must be str, not {type(name).__name__}")
    if key is not None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        if not KEY_MIN_BYTES <= len(key) <= KEY_MAX_BYTES:
            raise ValueError(f"key is {len(key)} bytes; a key-binding key has "
                             f"{KEY_MIN_BYTES} to {KEY_MAX_BYTES} bytes")
        key = bytes(key)
    info: dict[str, Any] = _json(client.call(Request(Opcode.STAT, 0, name=name), key=key).data)
    return info
