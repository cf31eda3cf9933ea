"""The service's own files cannot be steered by another user (issue "Security round 2",
item 7), with a real second uid (``nobody``) as the adversary and a real daemon.

Each test is a way root was steered before: a link planted at ``SOCKET.pub.tmp`` (root
overwrote and chmod'ed the link's target), a socket directory another user owns (they
replaced the socket and the ``.pub`` with their own service, and clients pinned it), a
``--dir`` or socket path reached through a link another user can swap.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esem.client.blocking import Client
from esem.errors import ServiceUnavailable
from esem.paths import KEY_NAME, pubkey_path
from esem.protocol.crypto import generate_static_key, public_key_of
from esem.server.embedded import EmbeddedService

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play two uids")
NOBODY = 65534
THIRD_UID = 424243  # a uid with no account: the third user whose client is the victim
SECRET = b"root's eyes only\n"


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory other uids can traverse (pytest's tmp_path is 0700)."""
    with tempfile.TemporaryDirectory(prefix="esem-files-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def _serve(state: Path, sock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "esem", "serve", "--dir", str(state), "--socket", str(sock)],
        capture_output=True, text=True, timeout=30,
    )


def as_uid(uid: int, body: Callable[[], object]) -> object:
    """Run ``body`` in a forked child that became ``uid`` (no groups); its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                result = body()
                code = 0
            except BaseException as exc:
                result = f"{type(exc).__name__}: {exc}"
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data or b"null")


def _secret(base: Path) -> Path:
    secret = base / "root-only"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    return secret


def _assert_untouched(secret: Path) -> None:
    assert secret.read_bytes() == SECRET
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def _nobody_dir(base: Path, name: str) -> Path:
    """A directory that ``nobody`` owns: it made it itself, in a sticky world-writable
    place as /tmp is (root makes that place; nobody makes its own directory there)."""
    sticky = base / "sticky"
    sticky.mkdir(exist_ok=True)
    os.chmod(sticky, 0o1777)
    theirs = sticky / name
    assert as_uid(NOBODY, lambda: theirs.mkdir(mode=0o755)) is None
    assert theirs.stat().st_uid == NOBODY
    return theirs


def test_planted_pub_tmp_link_does_not_make_root_write_or_chmod(base: Path) -> None:
    """nobody owns the socket's directory and plants SOCKET.pub.tmp -> a root-only file:
    the service refuses the directory; the file keeps its bytes and mode 0600."""
    secret = _secret(base)
    theirs = _nobody_dir(base, "sock")
    planted = theirs / "esem.sock.pub.tmp"
    assert as_uid(NOBODY, lambda: planted.symlink_to(secret)) is None
    result = _serve(base / "state", theirs / "esem.sock")
    assert result.returncode == 3, result.stderr
    assert "belongs to uid 65534, not to root" in result.stderr
    _assert_untouched(secret)
    assert not (theirs / "esem.sock").exists() and not (theirs / "esem.sock.pub").exists()


def test_leftover_pub_tmp_link_in_trusted_dir_is_replaced_not_followed(base: Path) -> None:
    """The mechanism, apart from the directory rule: even in a directory only root
    controls, a link at SOCKET.pub.tmp (a leftover, an operator's mistake) is removed,
    and the key is published in a new file of the service's own."""
    secret = _secret(base)
    (base / "run").mkdir()
    (base / "run" / "esem.sock.pub.tmp").symlink_to(secret)
    with EmbeddedService(base / "run") as svc:
        pub = pubkey_path(svc.socket_path)
        st = os.lstat(pub)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
        assert bytes.fromhex(pub.read_text()) == public_key_of(
            (base / "run" / KEY_NAME).read_bytes())
        assert not (base / "run" / "esem.sock.pub.tmp").exists()
    _assert_untouched(secret)


@pytest.mark.parametrize("how", ["owned by nobody", "group-writable", "world-writable"])
def test_socket_dir_another_user_controls_is_refused_at_start(base: Path, how: str) -> None:
    if how == "owned by nobody":
        sock_dir = _nobody_dir(base, "sock")
    else:
        sock_dir = base / "sock"
        sock_dir.mkdir()
        os.chmod(sock_dir, 0o775 if how == "group-writable" else 0o777)
    result = _serve(base / "state", sock_dir / "esem.sock")
    assert result.returncode == 3, result.stderr
    assert ("belongs to uid 65534" if how == "owned by nobody" else "writable by others") \
        in result.stderr
    assert not (sock_dir / "esem.sock").exists()


def _impostor(directory: Path, ready: Callable[[], None]) -> dict[str, object]:
    """As nobody: publish a key of its own and listen at directory/esem.sock; report
    whether any client connected within a few seconds."""
    fake = generate_static_key()
    sock_path = directory / "esem.sock"
    pubkey_path(sock_path).write_text(public_key_of(fake).hex() + "\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(sock_path))
        os.chmod(sock_path, 0o666)
        listener.listen(4)
        ready()
        got, _, _ = select.select([listener], [], [], 4.0)
    return {"connections": len(got)}


def _start_impostor(directory: Path) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            result = _impostor(directory, lambda: os.write(w, b"r"))
            os.write(w, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    assert os.read(r, 1) == b"r"
    return pid, r


def _finish(pid: int, fd: int) -> dict[str, object]:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    os.close(fd)
    os.waitpid(pid, 0)
    result: dict[str, object] = json.loads(data)
    return result


def _client_result(sock: Path) -> str:
    try:
        Client(sock, connect_timeout=1.0).connect()
    except ServiceUnavailable as exc:
        return f"refused: {exc}"
    except Exception as exc:  # an impostor that speaks garbage: not a refusal of the path
        return f"other: {type(exc).__name__}: {exc}"
    return "connected"


@pytest.mark.parametrize("victim", [0, THIRD_UID], ids=["root", "third-uid"])
def test_client_refuses_impostor_in_a_directory_the_attacker_owns(base: Path,
                                                                  victim: int) -> None:
    """nobody's own directory holds its socket and its .pub: a client pointed there
    (ESEM_SOCKET) refuses to pin that key and never connects."""
    theirs = _nobody_dir(base, "sock")
    pid, fd = _start_impostor(theirs)
    seen = as_uid(victim, lambda: _client_result(theirs / "esem.sock"))
    fake = _finish(pid, fd)
    assert isinstance(seen, str) and seen.startswith("refused:"), seen
    assert "belongs to uid 65534" in seen
    assert fake == {"connections": 0}


def test_symlinked_dir_is_refused_by_service_and_client(base: Path) -> None:
    real = base / "real"
    real.mkdir()
    link = base / "link"
    link.symlink_to(real)
    result = _serve(link, link / "esem.sock")
    assert result.returncode == 3, result.stderr
    assert f"{link} is a symbolic link" in result.stderr
    assert list(real.iterdir()) == []
    with EmbeddedService(real) as svc:
        Client(svc.socket_path).connect()  # the real path is fine
        assert _client_result(link / "esem.sock").startswith("refused:")


def test_swapped_symlink_cannot_redirect_a_client(base: Path) -> None:
    """nobody's link in a sticky directory points at the real service's directory, then
    is swapped to nobody's impostor directory (no fs.protected_symlinks needed): the
    client refuses the path both before and after the swap."""
    real = base / "real"
    real.mkdir()
    sticky = _nobody_dir(base, "unused").parent
    link = sticky / "esem-link"
    assert as_uid(NOBODY, lambda: link.symlink_to(real)) is None
    theirs = _nobody_dir(base, "fake")
    with EmbeddedService(real):
        before = _client_result(link / "esem.sock")
        assert before.startswith("refused:") and "symbolic link" in before, before

        def swap() -> None:
            tmp = sticky / "esem-link.new"
            tmp.symlink_to(theirs)
            os.replace(tmp, link)

        assert as_uid(NOBODY, swap) is None
        assert os.readlink(link) == str(theirs)
        pid, fd = _start_impostor(theirs)
        after = _client_result(link / "esem.sock")
        fake = _finish(pid, fd)
    assert after.startswith("refused:") and "symbolic link" in after, after
    assert fake == {"connections": 0}


def test_stale_socket_of_the_service_is_still_replaced(base: Path) -> None:
    """What the rule must keep working: a restart after a crash in the same directory."""
    (base / "run").mkdir()
    with EmbeddedService(base / "run") as svc:
        assert svc.proc is not None
        svc.kill()
        assert svc.socket_path.exists()  # SIGKILL: left behind
    with EmbeddedService(base / "run") as again:
        Client(again.socket_path).connect()
