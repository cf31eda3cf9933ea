"""The descriptors a switchless upgrade brings (memfd, doorbell) are close-on-exec.

SCM_RIGHTS descriptors arrive inheritable unless received with ``MSG_CMSG_CLOEXEC``;
inherited, they would leak into every program the process runs (which could then write
the rings, and would keep the session's rings alive after the process ends).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator

import pytest

from esem.client.blocking import Client
from esem.server.embedded import EmbeddedService


@pytest.fixture
def ring_client(python_switchless_service: EmbeddedService) -> Iterator[Client]:
    client = Client(switchless=True)
    client.connect()
    assert client._ring is not None
    try:
        yield client
    finally:
        client.close()


def _targets(pid: int | str) -> dict[int, str]:
    out = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            out[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
    return out


def test_ring_descriptors_are_close_on_exec(ring_client: Client) -> None:
    ring = ring_client._ring
    assert ring is not None
    fds = [ring.memfd, ring._bell.fileno()]
    for fd in fds:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, fd
    mine = _targets("self")
    leaked = {mine[fd] for fd in fds}
    assert any(t.startswith("/memfd:esem-ring") for t in leaked)

    # Control: a descriptor made inheritable on purpose does reach the exec'd child, so
    # the check below looks where leaks would show.
    r, w = os.pipe()
    os.set_inheritable(r, True)
    pipe = os.readlink(f"/proc/self/fd/{r}")
    child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        theirs = _targets(child.pid)  # Popen returns once the exec has happened
    finally:
        child.kill()
        child.wait()
        os.close(r)
        os.close(w)
    assert pipe in theirs.values()
    assert not leaked & set(theirs.values()), theirs
