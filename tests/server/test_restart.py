"""A service restarted on its journal (SIGKILL, then a new daemon in the same directory)
restores every semaphore and session exactly (docs/design.md; PROTOCOL.md 16, 17): queued
waits in their FIFO place with their deadlines, holdings, a grant made before the client
resumed delivered once; a client that died during the outage is handled by the grace
rules; a journal that does not verify stops the start with a message; version-1 journals
stay readable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.core.status import Status
from esem.core.table import WaitMode
from esem.protocol.constants import Opcode
from esem.protocol.messages import Request
from esem.server.embedded import EmbeddedService
from esem.server.journal import HEAD_NAME, JOURNAL_NAME

from .rawclient import Raw

FIXTURE = Path(__file__).parent / "data" / "journal-v1"
FIXTURE_V2 = Path(__file__).parent / "data" / "journal-v2"


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[EmbeddedService]:
    service = EmbeddedService(tmp_path / "svc", extra_args=["--resume-grace", "3"])
    with service:
        yield service


def raw(svc: EmbeddedService) -> Raw:
    return Raw(svc.socket_path, svc.pubkey)


def stat(svc: EmbeddedService, name: str) -> dict[str, object]:
    c = raw(svc)
    r = c.call(Request(Opcode.STAT, 0, name=name))
    c.call(Request(Opcode.END, 0))
    assert r.status is Status.OK, r
    data: dict[str, object] = json.loads(r.data)
    return data


def restart(svc: EmbeddedService) -> None:
    svc.kill()
    svc.start()


def test_semaphores_queues_and_deadlines_survive_a_sigkill(svc: EmbeddedService) -> None:
    a, b, p = raw(svc), raw(svc), raw(svc)
    ha = a.open("/q")
    hb = b.open("/q")
    hp = p.open("/q")
    wa = a.send(Request(Opcode.WAIT, 0, handle=ha, wait_mode=WaitMode.TIMED,
                        timeout_ns=3600 * 10**9))
    time.sleep(0.05)
    wb = b.wait(hb)
    time.sleep(0.05)
    c = raw(svc)
    hc = c.open("/counted", value=5)
    assert c.call(Request(Opcode.WAIT, 0, handle=hc)).status is Status.OK
    before = stat(svc, "/q")
    restart(svc)
    after = stat(svc, "/q")
    assert after["queue"] == before["queue"]  # same waiters, same order, same deadlines
    assert stat(svc, "/counted")["value"] == 4 and stat(svc, "/counted")["holders_total"] == 1
    a2, b2, p2 = raw(svc), raw(svc), raw(svc)
    assert a2.resume(a).status is Status.OK
    assert b2.resume(b).status is Status.OK
    assert p2.resume(p).status is Status.OK
    assert p2.call(Request(Opcode.POST, 0, handle=hp)).status is Status.OK
    assert a2.reply(wa).status is Status.OK  # A was first, and is first
    assert b2.quiet() == []
    assert p2.call(Request(Opcode.POST, 0, handle=hp)).status is Status.OK
    assert b2.reply(wb).status is Status.OK


def test_a_grant_made_before_the_client_resumed_is_delivered_once(svc: EmbeddedService) -> None:
    a, p = raw(svc), raw(svc)
    ha = a.open("/g")
    p.open("/g")
    wa = a.wait(ha)
    time.sleep(0.05)
    restart(svc)
    p2 = raw(svc)
    assert p2.resume(p).status is Status.OK
    hp2 = p2.open("/g")
    assert p2.call(Request(Opcode.POST, 0, handle=hp2)).status is Status.OK  # A is detached
    restart(svc)  # and once more: the grant is in the journal's replay window
    a2 = raw(svc)
    r = a2.resume(a)
    assert r.status is Status.OK and r.value >= wa
    assert a2.reply(wa).status is Status.OK
    assert a2.quiet() == []
    s = stat(svc, "/g")
    assert s["value"] == 0 and s["holders_total"] == 1


def test_a_client_that_died_during_the_outage_is_handled_by_the_robust_rule(
        svc: EmbeddedService) -> None:
    c = raw(svc)
    c.open("/r", value=1, robust=True)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            x = raw(svc)
            h = x.open("/r", robust=True)
            x.call(Request(Opcode.WAIT, 0, handle=h))
            os.write(write, b"!")
            time.sleep(60)
        finally:
            os._exit(0)
    assert os.read(read, 1) == b"!"
    assert stat(svc, "/r")["value"] == 0
    svc.kill()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    svc.start()
    time.sleep(0.5)  # its process is gone: it ends at once, not after the grace period
    s = stat(svc, "/r")
    assert s["value"] == 1 and s["holders_total"] == 0 and s["robust_releases"] == 1


def test_a_corrupted_journal_stops_the_start_and_says_why(svc: EmbeddedService) -> None:
    raw(svc).open("/c", value=3)
    svc.kill()
    path = svc.dir / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="exited with 3") as exc:
        svc.start()
    assert "cannot be used" in str(exc.value) and "does not verify" in str(exc.value)
    assert path.read_bytes() == before  # never started empty over it
    assert not (svc.dir / "esem.sock.pub").exists()


def test_no_journal_means_a_restart_loses_everything(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path / "mem", extra_args=["--no-journal"]) as svc:
        raw(svc).open("/gone", value=1)
        restart(svc)
        c = raw(svc)
        assert c.call(Request(Opcode.STAT, 0, name="/gone")).status is Status.ENOENT
        assert not (svc.dir / JOURNAL_NAME).exists()


def test_a_version_1_journal_is_read(tmp_path: Path) -> None:
    """A committed journal written by the version-1 writer (tests/server/data/journal-v1,
    made by ``make_fixture`` below): a newer service must keep reading it. It comes from
    another boot, so its sessions end at restore and its semaphores remain."""
    d = tmp_path / "v1"
    shutil.copytree(FIXTURE, d)
    os.chmod(d / "service.key", 0o600)
    with EmbeddedService(d) as svc:
        time.sleep(0.5)  # on the boot that made it: its process is gone, checked at once
        s = stat(svc, "/v1-plain")
        assert (s["value"], s["posts"], s["waits"]) == (2, 2, 3)
        assert s["dead_holders_total"] == 1  # its holder's session ended (another boot)
        r = stat(svc, "/v1-robust")
        assert r["value"] == 1 and r["robust_releases"] == 1


def _version(directory: Path) -> tuple[int, int]:
    """The journal file's format version, and the size of its head."""
    data = (directory / JOURNAL_NAME).read_bytes()
    return int.from_bytes(data[8:10], "big"), (directory / HEAD_NAME).stat().st_size


def test_a_version_1_journal_is_rewritten_as_version_2_at_start(tmp_path: Path) -> None:
    d = tmp_path / "v1"
    shutil.copytree(FIXTURE, d)
    os.chmod(d / "service.key", 0o600)
    assert _version(d) == (1, 82)
    svc = EmbeddedService(d)
    with svc:
        assert _version(d) == (2, 132)  # the start's compaction wrote version 2
        raw(svc).open("/after-upgrade", value=4)
        restart(svc)  # and the service reads what it wrote: state and the new record
        assert _version(d) == (2, 132)
        assert stat(svc, "/v1-plain")["value"] == 2
        assert stat(svc, "/after-upgrade")["value"] == 4


def test_a_version_2_journal_is_read(tmp_path: Path) -> None:
    """A committed journal written by the version-2 writer (tests/server/data/journal-v2,
    ``make_fixture(.., 2)`` below), with every kind of change: start, requests replied
    and queued, a timed wait's expiry, detach, resume, end."""
    d = tmp_path / "v2"
    shutil.copytree(FIXTURE_V2, d)
    os.chmod(d / "service.key", 0o600)
    assert _version(d) == (2, 132)
    kinds = _kinds(d)
    assert {"start", "req", "expire", "detach", "resume", "end"} <= kinds
    with EmbeddedService(d) as svc:
        time.sleep(0.5)
        s = stat(svc, "/v1-plain")
        assert (s["value"], s["posts"], s["waits"]) == (2, 2, 3)
        assert stat(svc, "/v1-robust")["robust_releases"] == 1
        t = stat(svc, "/v2-timed")
        # one timed wait expired, one queued and granted by the resumed session's post
        assert (t["value"], t["posts"], t["waits"], t["dead_holders_total"]) == (0, 1, 1, 1)


def _kinds(d: Path) -> set[str]:
    from esem.server import journal as jr

    fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        got = jr.load(fd, (d / "service.key").read_bytes())
    finally:
        os.close(fd)
    assert got is not None
    return {r[0] for _, r in got.records}


def make_fixture(directory: Path, version: int = 2) -> None:
    """Write tests/server/data/journal-vN (run by hand, with the writer of that version:
    python -m tests.server.test_restart N)."""
    with EmbeddedService(directory, extra_args=["--resume-grace", "30"]) as svc:
        a = raw(svc)
        h = a.open("/v1-plain", value=3)
        a.call(Request(Opcode.POST, 0, handle=h))
        a.call(Request(Opcode.WAIT, 0, handle=h))
        a.call(Request(Opcode.WAIT, 0, handle=h))
        r = a.open("/v1-robust", value=1, robust=True)
        a.call(Request(Opcode.WAIT, 0, handle=r))
        a.call(Request(Opcode.POST, 0, handle=h))
        a.call(Request(Opcode.WAIT, 0, handle=h))
        if version >= 2:
            b = raw(svc)
            t = b.open("/v2-timed", value=0)
            r1 = b.call(Request(Opcode.WAIT, 0, handle=t, wait_mode=WaitMode.TIMED,
                                timeout_ns=50_000_000))
            assert r1.status is Status.ETIMEDOUT, r1
            queued = b.wait(t)
            b.drop()
            c = raw(svc)
            assert c.resume(b).status is Status.OK
            assert c.call(Request(Opcode.POST, 0, handle=t)).status is Status.OK
            assert c.reply(queued).status is Status.OK
            c.call(Request(Opcode.END, 0))
            # END's reply goes out before its "end" change is committed: a later
            # request's commit writes it
            a.call(Request(Opcode.STAT, 0, name="/v2-timed"))
        svc.kill()
    for name in ("service.log", "esem.sock", "esem.sock.pub"):
        (directory / name).unlink(missing_ok=True)


if __name__ == "__main__":
    import sys

    v = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    make_fixture(FIXTURE_V2 if v == 2 else FIXTURE, v)


def test_an_ended_session_is_never_restored(svc: EmbeddedService) -> None:
    """END's reply is written only after the session's end is journaled: a service
    killed the moment the client has that reply restarts without the session (its
    RESUME is ENOENT), never with it detached. Client and service share one vCPU, so
    the reply's wake-up runs the client (and its SIGKILL) before the service goes on."""
    assert svc.proc is not None
    mine = os.sched_getaffinity(0)
    cpu = min(mine)
    try:
        os.sched_setaffinity(0, {cpu})
        for _ in range(10):
            assert svc.proc is not None
            os.sched_setaffinity(svc.proc.pid, {cpu})
            a = raw(svc)
            assert a.call(Request(Opcode.PING, 0)).status is Status.OK
            assert a.call(Request(Opcode.END, 0)).status is Status.OK
            os.kill(svc.proc.pid, signal.SIGKILL)
            restart(svc)
            assert raw(svc).resume(a).status is Status.ENOENT
    finally:
        os.sched_setaffinity(0, mine)
