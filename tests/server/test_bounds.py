"""Security round 2, items 3-6, against a real daemon: what a tenant can see of a
key-bound semaphore, bounded admin views, handshake and half-open limits, bounded
output buffering, and the log's budget and escaping.

Each daemon is a real ``python -m esem serve``; clients are real sockets (the raw ones
speak the protocol through ``ClientSession`` so they can misbehave: never send a HELLO,
never read a reply).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink
from esem.attack.a7_exhaust import RawSession
from esem.client.admin import list_pages, list_semaphores, stat_semaphore
from esem.client.blocking import Client
from esem.core.table import WaitMode
from esem.errors import KeyRejected, QuotaExceeded
from esem.protocol.constants import FrameKind, Opcode
from esem.protocol.messages import Request
from esem.protocol.session import ClientSession
from esem.server import lograte, service
from esem.server.embedded import EmbeddedService

KEY = bytes(range(16))
MK = O_CREAT | O_EXCL


@pytest.fixture(scope="module")
def svc() -> Iterator[EmbeddedService]:
    with EmbeddedService() as s:
        yield s


@pytest.fixture
def small() -> Iterator[EmbeddedService]:
    """A daemon of this test alone with a session quota of 2 per uid."""
    with EmbeddedService(extra_args=["--quota-sessions", "2"]) as s:
        yield s


def _name(tag: str = "") -> str:
    return f"/bounds-{tag}{uuid.uuid4().hex[:12]}"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ------------------------------------------------- item 3: key-bound views


def test_key_bound_stat_and_list_show_only_public_fields_without_the_key(
    svc: EmbeddedService,
) -> None:
    client = Client(svc.socket_path)
    name = _name("k")
    sem = sem_open(name, MK, 0o644, 3, flags=USE_ESEM, client=client, key=KEY)
    sem.wait()
    try:
        # root, and the owner: still only the public fields without the key.
        public = stat_semaphore(client, name)
        assert public["key_bound"] is True and public["name"] == name
        assert public["owner_uid"] == os.getuid() and public["mode"] == 0o644
        for hidden in ("value", "initial", "handles", "waiters", "posts", "waits",
                       "robust_releases", "holders", "dead_holders", "queue",
                       "holders_total", "queue_total"):
            assert public[hidden] is None, hidden
        entry = next(e for e in list_semaphores(client) if e["name"] == name)
        assert entry["key_bound"] is True and entry["value"] is None
        assert entry["waits"] is None and entry["handles"] is None
        # With the key: the full view, its reply MAC'd under the key (the client
        # refuses an OK reply to a MAC'd request that does not prove the key).
        full = stat_semaphore(client, name, key=KEY)
        assert full["value"] == 2 and full["waits"] == 1 and full["handles"] == 1
        assert full["holders"] == [[os.getpid(), 1]] and full["holders_total"] == 1
        with pytest.raises(KeyRejected):
            stat_semaphore(client, name, key=b"\x01" * 16)
        assert client.call(Request(Opcode.PING, 0)).status == 0  # the session lives on
    finally:
        sem.close()
        sem_unlink(name, flags=USE_ESEM, client=client, key=KEY)
        client.close()


def test_stat_with_a_key_of_an_unbound_semaphore_is_refused(svc: EmbeddedService) -> None:
    client = Client(svc.socket_path)
    name = _name("u")
    sem = sem_open(name, MK, 0o600, 1, flags=USE_ESEM, client=client)
    try:
        with pytest.raises(KeyRejected, match="not key-bound"):
            stat_semaphore(client, name, key=KEY)
        assert stat_semaphore(client, name)["value"] == 1
        with pytest.raises(ValueError):
            stat_semaphore(client, name, key=b"short")
    finally:
        sem.close()
        sem_unlink(name, flags=USE_ESEM, client=client)
        client.close()


# ---------------------------------------------- item 4: bounded admin views


def test_list_pages_by_cursor_every_name_once_in_order(svc: EmbeddedService) -> None:
    client = Client(svc.socket_path)
    tag = uuid.uuid4().hex[:6]
    names = [f"/bounds-page-{tag}-{i:03d}" for i in range(150)]
    for n in names:
        sem_open(n, MK, 0o600, 0, flags=USE_ESEM, client=client).close()
    try:
        pages = list(list_pages(client))
        assert len(pages) >= 3  # 150 entries do not fit one page
        assert all(len(p) <= service.LIST_PAGE_ENTRIES for p in pages)
        listed = [e["name"] for p in pages for e in p]
        assert listed == sorted(listed) and len(listed) == len(set(listed))
        mine = [n for n in listed if f"-{tag}-" in n]
        assert mine == names
        # A cursor is a position, not an index: after a name that no longer exists
        # (or never did), the next page starts with the next name in order.
        raw = json.loads(client.call(Request(Opcode.LIST, 0,
                                             after=names[41] + "~")).data)
        assert raw["entries"][0]["name"] == names[42] and raw["more"] is True
        assert raw["total"] >= 150
    finally:
        for n in names:
            Client.call(client, Request(Opcode.UNLINK, 0, name=n))
        client.close()


def test_stat_lists_are_capped_and_counted_exactly(svc: EmbeddedService) -> None:
    client = Client(svc.socket_path)
    name = _name("q")
    sem_open(name, MK, 0o644, 0, flags=USE_ESEM, client=client)
    raws = [RawSession(svc.socket_path, svc.pubkey) for _ in range(2)]
    try:
        waits = 100
        for raw in raws:
            handle = raw.reply(raw.send(Request(Opcode.OPEN, 0, name=name))).handle
            for _ in range(waits // 2):
                raw.send(Request(Opcode.WAIT, 0, handle=handle, wait_mode=WaitMode.BLOCK))
            raw.reply(raw.send(Request(Opcode.PING, 0)))
        info = stat_semaphore(client, name)
        assert info["waiters"] == waits and info["queue_total"] == waits
        assert len(info["queue"]) == service.STAT_LIST_CAP
        first = info["queue"][0]
        assert first[0] == os.getpid() and first[2] is None
    finally:
        for raw in raws:
            raw.close()
        client.call(Request(Opcode.UNLINK, 0, name=name))
        client.close()


def test_a_client_that_never_reads_cannot_make_the_service_buffer_its_replies(
    tmp_path: Path,
) -> None:
    """Before the fix the service executed a whole read of requests before looking at
    its output: one connection sending LIST and never reading grew it ~80 MB."""
    with EmbeddedService(tmp_path / "svc") as svc:
        assert svc.proc is not None
        client = Client(svc.socket_path)
        for i in range(200):  # pages of ~50 entries: ~14 KB per LIST reply
            sem_open(f"/bounds-sink-{i:03d}", MK, 0o644, 0, flags=USE_ESEM,
                     client=client).close()
        before = _rss_kib(svc.proc.pid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(svc.socket_path))
        session = ClientSession(svc.pubkey)
        sock.sendall(session.start())
        while not session.established:
            session.receive_data(sock.recv(4096))
        frames = b"".join(
            session.send_request(Request(Opcode.LIST, 0), req_id=session.next_request_id())
            for _ in range(40000))  # 1.3 MB of requests, ~560 MB of replies
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while sent < len(frames) and time.monotonic() < deadline:
            try:
                sent += sock.send(frames[sent:])
            except BlockingIOError:
                time.sleep(0.05)
        time.sleep(0.5)
        grown_mb = (_rss_kib(svc.proc.pid) - before) / 1024
        # Meanwhile another session is served at once.
        assert client.call(Request(Opcode.PING, 0)).status == 0
        assert grown_mb < 32, f"service grew {grown_mb:.0f} MB for one non-reading client"
        assert sent < len(frames), "the service read every request of a non-reader"
        sock.close()
        client.close()


# ----------------------------------------------- item 5: handshake limits


def _raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def test_connections_without_hello_hold_no_session_slot(small: EmbeddedService) -> None:
    """Before: every accepted connection took one of its uid's sessions at once, so
    connections that never say HELLO locked the uid (and here, root) out."""
    held = [_raw_connect(small.socket_path) for _ in range(6)]
    try:
        time.sleep(0.2)
        clients = [Client(small.socket_path) for _ in range(2)]
        for c in clients:
            assert c.call(Request(Opcode.PING, 0)).status == 0
        third = Client(small.socket_path)
        with pytest.raises(QuotaExceeded, match="sessions"):
            third.call(Request(Opcode.PING, 0))  # refused after its HELLO: REFUSED
        third.close()
        for c in clients:
            c.close()
    finally:
        for s in held:
            s.close()


def test_half_open_connections_are_closed_after_the_handshake_timeout(
    svc: EmbeddedService,
) -> None:
    start = time.monotonic()
    held = [_raw_connect(svc.socket_path) for _ in range(service.HALF_OPEN_PER_UID + 8)]
    try:
        time.sleep(0.3)
        refused = 0
        for s in held[service.HALF_OPEN_PER_UID:]:
            s.settimeout(1)
            head = s.recv(64)
            assert len(head) >= 6 and head[5] == FrameKind.REFUSED
            assert b"in their handshake" in head
            refused += 1
        assert refused == 8
        for s in held[: service.HALF_OPEN_PER_UID]:
            s.settimeout(service.HANDSHAKE_TIMEOUT + 5 - (time.monotonic() - start))
            assert s.recv(64) == b""  # closed by the service, nothing said
        elapsed = time.monotonic() - start
        assert elapsed >= service.HANDSHAKE_TIMEOUT - 0.5
        c = Client(svc.socket_path)
        assert c.call(Request(Opcode.PING, 0)).status == 0
        c.close()
    finally:
        for s in held:
            s.close()


# ----------------------------------------------------- item 6: the log


def test_hostile_name_is_one_escaped_log_line_and_refusals_are_budgeted(
    tmp_path: Path,
) -> None:
    with EmbeddedService(tmp_path / "svc") as svc:
        hostile = "/x\nFORGED session 1 start pid=1 uid=0\x1b[2J\x1b]0;t\x07"
        client = Client(svc.socket_path)
        size0 = svc.log_path.stat().st_size
        frames = 0
        t0 = time.monotonic()
        for _ in range(20):  # 20 x 250 refused STATs (ENOENT), pipelined
            ids = [client.send(Request(Opcode.STAT, 0, name=hostile)) for _ in range(250)]
            for i in ids:
                assert client.wait_reply(i).status != 0
            frames += len(ids)
        elapsed = time.monotonic() - t0
        client.close()
        time.sleep(0.3)
        text = svc.log_path.read_bytes()[size0:].decode()
        assert "\x1b" not in text and "\x07" not in text
        lines = text.splitlines()
        assert not any(line.startswith("FORGED") for line in lines)
        refused = [line for line in lines if "refused STAT" in line]
        assert refused, text
        assert all("/x\\nFORGED session 1 start pid=1 uid=0\\x1b[2J\\x1b]0;t\\x07" in line
                   for line in refused)
        budget = lograte.LOG_BURST + lograte.LOG_RATE * elapsed + 1
        assert len(refused) <= budget, (len(refused), frames)
        assert any("suppressed" in line for line in lines)
        assert len(text) < 200 * (budget + 10)  # not one line per refused request
