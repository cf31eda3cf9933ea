"""Read-only views of the service for operators: ``esem ls`` and ``esem stat``."""

from __future__ import annotations

import json
from typing import Any

from esem.client.blocking import Client
from esem.errors import ProtocolError
from esem.protocol.constants import Opcode
from esem.protocol.messages import Request


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ProtocolError("service sent malformed JSON") from exc


def list_semaphores(client: Client) -> list[dict[str, Any]]:
    """Every named semaphore of the service, paged through LIST."""
    entries: list[dict[str, Any]] = []
    while True:
        page = _json(client.call(Request(Opcode.LIST, 0, offset=len(entries))).data)
        entries.extend(page["entries"])
        if not page["entries"] or len(entries) >= page["total"]:
            return entries


def stat_semaphore(client: Client, name: str) -> dict[str, Any]:
    info: dict[str, Any] = _json(client.call(Request(Opcode.STAT, 0, name=name)).data)
    return info
