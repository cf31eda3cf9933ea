"""The native client (``native/esem-client``) against the real Python service: every
operation, key-bound semaphores, a hand-off between two processes, a handle inherited
across fork (ATTACH), descriptor placement, and a man in the middle flipping one byte,
which must give an error and never a grant.

The client is driven through its ``esemc`` example, one command per line.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from esem.api import USE_ESEM, sem_open
from esem.attack.a2_mitm import MitmProxy, frame
from esem.client.admin import stat_semaphore
from esem.client.blocking import get_client
from esem.server.embedded import EmbeddedService

KEY = "6b" * 24


def stat(name: str) -> dict[str, Any]:
    return stat_semaphore(get_client(), name)


class Esemc:
    def __init__(self, exe: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, **(env or {})},
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self, hang: float = 60.0) -> str:
        """The next answer line; a client that says nothing for ``hang`` seconds has
        hung (a failure, not a timing measurement)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], hang)
        assert ready, "esemc hung"
        out = self.proc.stdout.readline().strip()
        assert out, "esemc exited"
        return out

    def __call__(self, line: str) -> str:
        self.send(line)
        return self.answer()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def esemc(native_build: Path, service: EmbeddedService) -> Iterator[Callable[..., Esemc]]:
    made: list[Esemc] = []

    def new(env: dict[str, str] | None = None) -> Esemc:
        tool = Esemc(native_build / "examples" / "esemc", env)
        made.append(tool)
        return tool

    yield new
    for tool in made:
        tool.close()


def test_every_operation(esemc: Callable[..., Esemc], sem_name: str) -> None:
    c = esemc()
    assert c(f"open {sem_name} cx 1 600") == "ok created=1"
    assert c("value") == "ok 1"
    assert c("trywait") == "ok"
    assert c("trywait").startswith("err Status EAGAIN")
    assert c("timedwait 50").startswith("err Status ETIMEDOUT")
    assert c("post") == "ok"
    assert c("timedwait 1000") == "ok"
    assert c("post") == "ok"
    assert c("wait") == "ok"
    assert c("value") == "ok 0"
    # The Python API sees the same semaphore.
    sem = sem_open(sem_name, 0, flags=USE_ESEM)
    sem.post()
    assert c("value") == "ok 1"
    sem.close()
    assert c("close") == "ok"
    assert c("value").startswith("err Status EBADF")
    assert c(f"unlink {sem_name}") == "ok"
    assert c(f"unlink {sem_name}").startswith("err Status ENOENT")
    assert c(f"open {sem_name} - 0 600").startswith("err Status ENOENT")
    assert c("open /bad/name c 0 600").startswith("err Invalid")


def test_umask_applies_to_mode(esemc: Callable[..., Esemc], sem_name: str) -> None:
    c = esemc()
    assert c(f"open {sem_name} c 0 666") == "ok created=1"
    old = os.umask(0)
    os.umask(old)
    assert stat(sem_name)["mode"] == 0o666 & ~old
    assert c(f"unlink {sem_name}") == "ok"


def test_key_bound(esemc: Callable[..., Esemc], sem_name: str) -> None:
    c = esemc()
    assert c(f"open {sem_name} c 0 600 {KEY}") == "ok created=1"
    assert c("post") == "ok"
    assert stat(sem_name)["key_bound"] is True
    # Another process without the key cannot open it; with the wrong key neither.
    d = esemc()
    assert d(f"open {sem_name} - 0 600").startswith("err Status EKEYREJECTED")
    assert d(f"open {sem_name} - 0 600 {'00' * 24}").startswith("err Status EKEYREJECTED")
    assert d(f"open {sem_name} - 0 600 {KEY}") == "ok created=0"
    assert d("wait") == "ok"
    assert c(f"unlink {sem_name}").startswith("err Status EKEYREJECTED")
    assert c(f"unlink {sem_name} {KEY}") == "ok"


def test_hand_off_between_two_processes(esemc: Callable[..., Esemc], sem_name: str) -> None:
    a, b = esemc(), esemc()
    assert a(f"open {sem_name} c 0 600") == "ok created=1"
    assert b(f"open {sem_name} - 0 600") == "ok created=0"
    a.send("wait")  # blocks in the service's queue
    time.sleep(0.2)
    assert stat(sem_name)["waiters"] == 1
    assert b("post") == "ok"
    assert a.answer() == "ok"
    assert a("value") == "ok 0"
    assert a(f"unlink {sem_name}") == "ok"


def test_blocked_waiter_does_not_delay_another_threads_post(
    native_build: Path, service: EmbeddedService, sem_name: str
) -> None:
    """Rust integration test binary: two threads share one session; one waits on an
    empty semaphore while the other posts to a second one and gets its answers."""
    result = subprocess.run(
        ["cargo", "test", "--quiet", "-p", "esem-client", "--test", "live",
         "--features", "esem-proto/deterministic", "--", "--test-threads=1"],
        cwd=native_build.parents[1], capture_output=True, text=True,
        env={**os.environ, "ESEM_TEST_NAME": sem_name}, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test result: ok" in result.stdout


def test_fork_child_attaches_inherited_handle(esemc: Callable[..., Esemc],
                                              sem_name: str) -> None:
    c = esemc()
    assert c(f"open {sem_name} c 0 600 {KEY}") == "ok created=1"
    assert c("fork-post") == "ok child=0"
    assert c("value") == "ok 1"
    # The parent's session survived its child's (no nonce was reused).
    assert c("post") == "ok"
    assert c("value") == "ok 2"
    assert c(f"unlink {sem_name} {KEY}") == "ok"


def test_descriptor_is_high_and_close_on_exec(esemc: Callable[..., Esemc]) -> None:
    c = esemc()
    fd = int(c("fd").split()[1])
    assert fd >= 100
    link = os.readlink(f"/proc/{c.proc.pid}/fd/{fd}")
    assert link.startswith("socket:")
    flags = Path(f"/proc/{c.proc.pid}/fdinfo/{fd}").read_text()
    assert int(flags.split("flags:")[1].split()[0], 8) & 0o2000000  # O_CLOEXEC


@pytest.mark.parametrize("key", [None, KEY])
def test_tampered_reply_is_an_error_never_a_grant(
    esemc: Callable[..., Esemc], service: EmbeddedService, sem_name: str, tmp_path: Path,
    key: str | None,
) -> None:
    """A man in the middle flips one byte of the service's reply to a WAIT: the client
    must fail with an integrity error, not report a grant it cannot prove."""
    suffix = f" {key}" if key else ""
    owner = esemc()
    assert owner(f"open {sem_name} c 0 600{suffix}") == "ok created=1"
    proxy = MitmProxy(service.socket_path, tmp_path / "mitm.sock").start()
    try:
        victim = esemc({"ESEM_SOCKET": str(proxy.path),
                        "ESEM_PUBKEY": service.pubkey.hex()})
        assert victim(f"open {sem_name} - 0 600{suffix}") == "ok created=0"
        link = proxy.link(0)
        flipped = threading.Event()

        def flip(_link: object, _index: int, body: bytes) -> list[bytes | float]:
            b = bytearray(body)
            b[len(b) // 2] ^= 0x01
            flipped.set()
            return [frame(bytes(b))]

        link.arm("s2c", flip)
        victim.send("wait")
        time.sleep(0.2)
        assert owner("post") == "ok"  # the service grants; the grant is tampered with
        answer = victim.answer()
        assert flipped.is_set()
        assert answer.startswith("err Integrity"), answer
        assert victim("post").startswith("err")  # sticky
    finally:
        proxy.stop()
    assert owner(f"unlink {sem_name}{suffix}") == "ok"


def test_wrong_pinned_key_never_connects(esemc: Callable[..., Esemc]) -> None:
    """A HELLO sealed to another key cannot be read by the service, which hangs up:
    the client reports the service unavailable and never runs an operation."""
    c = esemc({"ESEM_PUBKEY": "11" * 32})
    assert c("ping").startswith("err Unavailable")
    assert c("ping").startswith("err Unavailable")


def test_squatted_key_file_is_refused(esemc: Callable[..., Esemc], tmp_path: Path) -> None:
    """The published key's file checks (esem.paths.check_published_key): a key in a
    directory writable by others is not trusted."""
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    (d / "esem.sock.pub").write_text("11" * 32)
    c = esemc({"ESEM_SOCKET": str(d / "esem.sock")})
    answer = c("ping")
    assert answer.startswith("err Unavailable") and "writable by others" in answer, answer



def test_dropped_grant_surfaces_through_the_keepalive(
    esemc: Callable[..., Esemc], service: EmbeddedService, sem_name: str, tmp_path: Path
) -> None:
    """The adversary drops the service's grant: after KEEPALIVE_INTERVAL the client's
    PING is answered under the next counter, which fails authentication (PROTOCOL.md
    11): an error, never a hang and never a grant."""
    owner = esemc()
    assert owner(f"open {sem_name} c 0 600") == "ok created=1"
    proxy = MitmProxy(service.socket_path, tmp_path / "mitm.sock").start()
    try:
        victim = esemc({"ESEM_SOCKET": str(proxy.path), "ESEM_PUBKEY": service.pubkey.hex()})
        assert victim(f"open {sem_name} - 0 600") == "ok created=0"
        dropped = threading.Event()

        def drop(_link: object, _index: int, _body: bytes) -> list[bytes | float]:
            dropped.set()
            return []

        proxy.link(0).arm("s2c", drop)
        victim.send("wait")
        time.sleep(0.2)
        assert owner("post") == "ok"
        answer = victim.answer()
        assert dropped.is_set()
        assert answer.startswith("err Integrity"), answer
    finally:
        proxy.stop()
    assert owner(f"unlink {sem_name}") == "ok"


def test_replaced_descriptor_is_noticed_not_written(esemc: Callable[..., Esemc]) -> None:
    """A program that puts a socket of its own at the session's descriptor number: the
    client notices (the socket's identity is checked before each write and read) and
    fails the session instead of writing session bytes to the program's peer."""
    c = esemc()
    assert c("ping") == "ok"
    old_fd = c("clobber-fd").split()[1]
    # The next call fails (the write path saw it) or, if the reader thread saw it first
    # and failed the session, runs on a new session at another descriptor.
    first = c("ping")
    assert first == "ok" or first.startswith("err Unavailable"), first
    assert c("ping") == "ok"
    assert c("fd").split()[1] != old_fd
    assert c("peer") == "ok 0"
