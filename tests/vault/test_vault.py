"""The vault end to end: real TLS on 127.0.0.1, real threads, real semaphores (both
backends), real files; the failure paths a user or a broken client can reach."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esem.vault import tls
from esem.vault.client import VaultClient
from esem.vault.engine import SealingEngine
from esem.vault.errors import (
    AuthFailed,
    BadName,
    CertificateMismatch,
    Corrupt,
    DiskFull,
    NoSlot,
    NotFound,
    TooLarge,
    VaultUnavailable,
)
from esem.vault.filetree import FileTree
from esem.vault.limits import ENGINE_SLOTS, MAX_BODY_BYTES, MAX_UPLOAD_BYTES
from esem.vault.server import StartupError, VaultServer
from esem.vault.users import add_user, authenticate
from esem.vault.wire import MAGIC, PREFIX, encode_frame, read_frame, write_frame

from .conftest import ALICE, ALICE_PW, BOB, BOB_PW, Vault, new_vault_dir


def raw_connection(v: Vault, login: bool = True) -> ssl.SSLSocket:
    """A TLS connection to the vault speaking frames by hand (for what VaultClient
    refuses to send)."""
    ctx = tls.client_context((v.dir / tls.CERT_NAME).read_bytes())
    sock = ctx.wrap_socket(socket.create_connection((tls.HOST, v.server.port), 5),
                           server_hostname=tls.HOST)
    sock.settimeout(10)
    if login:
        write_frame(sock, {"op": "auth", "user": ALICE, "password": ALICE_PW})
        frame = read_frame(sock, MAX_BODY_BYTES)
        assert frame is not None and frame[0]["ok"] is True
    return sock


def reply(sock: ssl.SSLSocket) -> dict[str, object]:
    frame = read_frame(sock, MAX_BODY_BYTES)
    assert frame is not None
    return frame[0]


def closed_by_server(sock: ssl.SSLSocket) -> bool:
    try:
        return read_frame(sock, MAX_BODY_BYTES) is None
    except (OSError, ssl.SSLError):
        return True


def wait_connections(v: Vault, n: int) -> None:
    """Until the server has noticed closed connections and has ``n`` open (a condition
    awaited, not a timing asserted)."""
    deadline = time.monotonic() + 10
    while v.server.statistics()["connections"] != n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v.server.statistics()["connections"] == n


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in [*d.glob(".tmp-*"), *(d / "blobs").glob(".tmp-*")])


# ------------------------------------------------------------------ the happy path


def test_put_get_ls_rm(vault: Vault) -> None:
    files = {"report.pdf": os.urandom(10_000), "dir/with/slashes": b"x",
             "ünïcödé name": os.urandom(3), "empty": b""}
    with vault.client() as c:
        for name, data in files.items():
            c.put(name, data)
        for name, data in files.items():
            assert c.get(name) == data
        listing = {f.name: f.size for f in c.ls()}
        assert listing == {n: len(d) for n, d in files.items()}
        c.put("report.pdf", b"second version")  # replaces, does not duplicate
        assert c.get("report.pdf") == b"second version"
        assert len(c.ls()) == len(files)
        c.rm("report.pdf")
        with pytest.raises(NotFound):
            c.get("report.pdf")
        assert "report.pdf" not in {f.name for f in c.ls()}
    # One blob per file, the replaced and removed ones gone, nothing else left behind.
    assert len(list((vault.dir / "blobs").glob("*.blob"))) == len(files) - 1
    assert leftovers(vault.dir) == []


def test_ciphertext_only_on_disk(vault: Vault) -> None:
    secret = b"the plaintext must never reach the blob directory " * 20
    with vault.client() as c:
        c.put("secret", secret)
    for blob in (vault.dir / "blobs").glob("*.blob"):
        assert secret[:40] not in blob.read_bytes()
    assert secret[:40] not in (vault.dir / "filetree.json").read_bytes()


def test_files_belong_to_their_user(make_vault: Callable[..., Vault]) -> None:
    v = make_vault("esem")
    with v.client() as alice, v.client(BOB, BOB_PW) as bob:
        alice.put("notes", b"alice's")
        bob.put("notes", b"bob's")
        assert alice.get("notes") == b"alice's" and bob.get("notes") == b"bob's"
        bob.rm("notes")
        assert alice.get("notes") == b"alice's"
        with pytest.raises(NotFound):
            bob.get("notes")
        assert [f.name for f in bob.ls()] == []


def test_concurrent_clients_keep_every_file(vault: Vault) -> None:
    """More clients than engine slots: honest semaphores of either backend hold the
    engine to ENGINE_SLOTS threads and the tree to one writer, and lose nothing."""
    clients, per_client = ENGINE_SLOTS + 3, 4
    data = {f"c{i}/f{j}": os.urandom(500) for i in range(clients) for j in range(per_client)}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with vault.client() as c:
                for j in range(per_client):
                    c.put(f"c{i}/f{j}", data[f"c{i}/f{j}"])
                for j in range(per_client):
                    assert c.get(f"c{i}/f{j}") == data[f"c{i}/f{j}"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with vault.client() as c:
        assert {f.name for f in c.ls()} == set(data)
        assert all(c.get(n) == d for n, d in data.items())
    stats = vault.server.statistics()
    assert stats["engine"]["refusals"] == 0
    assert stats["peak_inside"]["sem_service"] <= ENGINE_SLOTS
    assert stats["peak_inside"]["sem_filetree"] == 1


# ------------------------------------------------------------------ authentication


def test_wrong_password_and_unknown_user_look_the_same(vault: Vault) -> None:
    answers = []
    for user, pw in ((ALICE, "not-her-password"), ("mallory", ALICE_PW), (ALICE, "")):
        with pytest.raises(AuthFailed) as info:
            vault.client(user, pw).ls()
        answers.append(str(info.value))
    assert len(set(answers)) == 1 and "authentication failed" in answers[0]
    with vault.client() as c:  # the server is fine
        c.put("after", b"ok")


def test_request_before_login_is_refused(vault: Vault) -> None:
    with raw_connection(vault, login=False) as sock:
        write_frame(sock, {"op": "ls"})
        r = reply(sock)
        assert r["ok"] is False and r["error"] == "not_authenticated" and r["close"] is True
        assert closed_by_server(sock)


def test_authenticate_rejects_non_strings(tmp_path: Path) -> None:
    add_user(tmp_path, ALICE, ALICE_PW)
    assert authenticate(tmp_path, ALICE, ALICE_PW) == ALICE
    for user, pw in ((None, ALICE_PW), (ALICE, None), (ALICE, "x" * 5000)):
        with pytest.raises(AuthFailed):
            authenticate(tmp_path, user, pw)


def test_adduser_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 8"):
        add_user(tmp_path, "carol", "short")
    with pytest.raises(ValueError, match="user name"):
        add_user(tmp_path, "no spaces", "long-enough")
    add_user(tmp_path, "carol", "long-enough")
    with pytest.raises(ValueError, match="already exists"):
        add_user(tmp_path, "carol", "another-one")
    add_user(tmp_path, "carol", "another-one", replace=True)
    assert authenticate(tmp_path, "carol", "another-one") == "carol"
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600


def test_certificate_is_pinned(make_vault: Callable[..., Vault]) -> None:
    """A client pinned to vault B's certificate refuses the server of vault A (as it
    would refuse anything else listening on that port)."""
    a, b = make_vault("legacy"), make_vault("legacy")
    impostor = VaultClient(ALICE, ALICE_PW, port=a.server.port,
                           cert_pem=(b.dir / tls.CERT_NAME).read_bytes())
    with pytest.raises(CertificateMismatch, match="not the pinned vault"):
        impostor.ls()


# ------------------------------------------------------------------ bad requests


def test_unknown_name(vault: Vault) -> None:
    with vault.client() as c:
        with pytest.raises(NotFound, match="no file named 'ghost'"):
            c.get("ghost")
        with pytest.raises(NotFound):
            c.rm("ghost")
        c.put("real", b"1")  # the connection is still good


def test_bad_names(vault: Vault) -> None:
    with vault.client() as c:
        for bad in ("", "x" * 256, "tab\there", " padded", "nul\0"):
            with pytest.raises(BadName):
                c.put(bad, b"data")
    # The server checks too, whatever a client sends; the connection survives.
    with raw_connection(vault) as sock:
        write_frame(sock, {"op": "put", "name": "bell\x07"}, b"data")
        r = reply(sock)
        assert r["error"] == "bad_name" and r["close"] is False
        write_frame(sock, {"op": "frobnicate"})
        assert reply(sock)["error"] == "bad_request"
        write_frame(sock, {"op": "get", "name": 42})
        assert reply(sock)["error"] == "bad_request"
        write_frame(sock, {"op": "ls"})
        assert reply(sock)["ok"] is True


def test_oversized_upload(vault: Vault) -> None:
    with vault.client() as c, pytest.raises(TooLarge):  # refused before sending
        c.put("huge", b"\0" * (MAX_UPLOAD_BYTES + 1))
    # A client that declares too much anyway is answered at once, without the server
    # reading (or buffering) the body, and closed.
    with raw_connection(vault) as sock:
        header = b'{"op":"put","name":"huge"}'
        sock.sendall(PREFIX.pack(MAGIC, len(header), MAX_UPLOAD_BYTES + 1) + header)
        r = reply(sock)
        assert r["error"] == "too_large" and r["close"] is True
        assert closed_by_server(sock)
    with vault.client() as c:
        assert c.ls() == []


def test_garbage_is_refused_and_harms_nobody(vault: Vault) -> None:
    with vault.client() as bystander:
        bystander.put("before", b"1")
        with raw_connection(vault) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            r = reply(sock)
            assert r["error"] == "bad_request" and closed_by_server(sock)
        with raw_connection(vault) as sock:
            sock.sendall(PREFIX.pack(MAGIC, 5, 0) + b"[1,2]")  # JSON, not an object
            assert reply(sock)["error"] == "bad_request"
        assert bystander.get("before") == b"1"


def test_disconnect_mid_upload_stores_nothing(vault: Vault) -> None:
    with vault.client() as bystander:
        bystander.put("kept", b"kept")
        sock = raw_connection(vault)
        frame = encode_frame({"op": "put", "name": "half"}, os.urandom(200_000))
        sock.sendall(frame[:50_000])
        sock.close()  # hangs up with 150 kB of the body unsent
        wait_connections(vault, 1)  # the bystander only
        assert [f.name for f in bystander.ls()] == ["kept"]
        assert bystander.get("kept") == b"kept"
    assert len(list((vault.dir / "blobs").glob("*.blob"))) == 1
    assert leftovers(vault.dir) == []
    assert vault.server.statistics()["requests"]["put"] == 1


def test_stop_closes_idle_connections(make_vault: Callable[..., Vault]) -> None:
    v = make_vault("esem")
    c = v.client()
    c.put("x", b"1")
    v.server.stop()  # must not wait for the idle client to time out
    assert v.server.statistics()["connections"] == 0
    assert not [t for t in threading.enumerate() if t.name == "vault-conn"]
    with pytest.raises(VaultUnavailable):
        c.get("x")


def test_no_server_is_unavailable(tmp_path: Path) -> None:
    d = new_vault_dir(tmp_path)
    with VaultServer(d, port=0, sync="legacy") as server:
        port = server.port
        pem = (d / tls.CERT_NAME).read_bytes()
    with pytest.raises(VaultUnavailable, match="no vault server answers"):
        VaultClient(ALICE, ALICE_PW, port=port, cert_pem=pem).ls()
    with pytest.raises(VaultUnavailable, match="no vault server is running"):
        VaultClient.for_directory(d, ALICE, ALICE_PW)


# ------------------------------------------------------------------ integrity and restarts


def test_tampered_blobs_are_corrupt_never_wrong_bytes(make_vault: Callable[..., Vault]) -> None:
    v = make_vault("esem")
    with v.client() as c:
        c.put("a", b"A" * 100)
        c.put("b", b"B" * 100)
        tree = FileTree(v.dir)
        found_a, found_b = tree.read().find(ALICE, "a"), tree.read().find(ALICE, "b")
        assert found_a is not None and found_b is not None
        pa, pb = tree.blob_path(found_a[0]), tree.blob_path(found_b[0])
        blob_a, blob_b = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(blob_b)  # another file's blob under this name
        with pytest.raises(Corrupt, match="failed authentication"):
            c.get("a")
        flipped = bytearray(blob_a)
        flipped[-1] ^= 1
        pa.write_bytes(bytes(flipped))
        with pytest.raises(Corrupt):
            c.get("a")
        pb.unlink()
        with pytest.raises(Corrupt, match="missing"):
            c.get("b")
        pa.write_bytes(blob_a)
        assert c.get("a") == b"A" * 100


def test_restart_keeps_files_and_sweeps_leftovers(tmp_path: Path,
                                                  make_vault: Callable[..., Vault]) -> None:
    v = make_vault("esem")
    with v.client() as c:
        c.put("survivor", b"still here")
    v.server.stop()
    # What a crash between a put's blob and its tree, or inside a write, leaves behind.
    (v.dir / "blobs" / "000999.blob").write_bytes(b"orphan")
    (v.dir / ".tmp-crashed").write_bytes(b"half a tree")
    v2 = make_vault("legacy", directory=v.dir)  # the backend may change between runs
    with v2.client() as c:
        assert c.get("survivor") == b"still here"
    assert not (v.dir / "blobs" / "000999.blob").exists()
    assert leftovers(v.dir) == []


def test_one_server_per_directory(make_vault: Callable[..., Vault]) -> None:
    v = make_vault("legacy")
    with pytest.raises(StartupError, match="already serving"):
        VaultServer(v.dir, port=0, sync="legacy").start()
    with v.client() as c:  # the first one is unaffected
        c.put("x", b"1")


def test_corrupt_tree_refuses_to_start(tmp_path: Path) -> None:
    d = new_vault_dir(tmp_path)
    VaultServer(d, port=0, sync="legacy").start().stop()
    (d / "filetree.json").write_text('{"format": "esem-vault-filetree", "version": 1, '
                                     '"nodes": {"0": {"owner": 1}}}')
    with pytest.raises(StartupError, match="malformed"):
        VaultServer(d, port=0, sync="legacy").start()


# ------------------------------------------------------------------ the engine


def test_engine_refuses_a_sixth_entrant() -> None:
    engine = SealingEngine(os.urandom(32), work_s=0.5)
    inside = [threading.Thread(target=engine.seal, args=("u", f"f{i}", b"x"))
              for i in range(ENGINE_SLOTS)]
    for t in inside:
        t.start()
    deadline = time.monotonic() + 10
    while engine.statistics()["occupied"] < ENGINE_SLOTS and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(NoSlot, match="no free slot"):
        engine.seal("u", "sixth", b"x")
    for t in inside:
        t.join()
    stats = engine.statistics()
    assert stats["refusals"] == 1 and stats["entries"] == ENGINE_SLOTS
    assert stats["peak_occupied"] == ENGINE_SLOTS and stats["occupied"] == 0
    engine.work_s = 0.0
    sealed = engine.seal("u", "f", b"payload")  # and it works again
    assert engine.unseal("u", "f", sealed.wrapped_key, sealed.blob) == b"payload"
    with pytest.raises(Corrupt):
        engine.unseal("u", "other name", sealed.wrapped_key, sealed.blob)


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs: a disk that really fills up (needs root to mount)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave_pages: int) -> None:
    """Fill the filesystem of ``path`` to the brim, then give ``leave_pages`` pages back."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    size = path.stat().st_size // 4096 * 4096
    os.truncate(path, max(0, size - leave_pages * 4096))


def test_full_disk_is_a_clear_error_and_corrupts_nothing(
        tiny_fs: Path, make_vault: Callable[..., Vault]) -> None:
    v = make_vault("esem", directory=new_vault_dir(tiny_fs))
    filler = tiny_fs / "filler"
    with v.client() as c:
        c.put("keep", b"k" * 1000)
        fill(filler, leave_pages=0)
        # The blob cannot be written.
        with pytest.raises(DiskFull, match=r"disk is full \(ENOSPC writing \d+\.blob\)"):
            c.put("big", os.urandom(50_000))
        # Room for the blob but not for the new tree: the tree stays as it was, and the
        # blob written for the free slot is taken back.
        filler.unlink()
        fill(filler, leave_pages=1)
        with pytest.raises(DiskFull, match=r"ENOSPC writing filetree\.json"):
            c.put("small", b"s")
        assert [f.name for f in c.ls()] == ["keep"]
        assert c.get("keep") == b"k" * 1000
        assert len(list((v.dir / "blobs").glob("*.blob"))) == 1
        assert leftovers(v.dir) == []
        filler.unlink()
        c.put("small", b"s")  # space again: business as usual
        assert c.get("small") == b"s"
    v.server.stop()
