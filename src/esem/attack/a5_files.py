"""A5 through the filesystem: another uid steers the service's files, not its socket.

The impersonator of ``a5_impersonator`` answers on a path; this one arranges the paths
themselves, as ``nobody`` (uid 65534) against a root service and a third user's
client, all real processes (it needs root to play the uids; otherwise ``n/a``):

* ``A5 planted link``: ``nobody`` owns the socket's directory and plants
  ``esem.sock.pub.tmp`` as a link to a file only root may read; a real ``esem serve``
  (as root) is pointed at that directory. Defended when root neither writes nor chmods
  the link's target (and so does not start there).
* ``A5 foreign socket dir``: ``nobody`` owns a directory with its own service (the real
  protocol, its own key) and its own ``.pub`` in it; a third user's client is pointed
  there (``ESEM_SOCKET``, no ``ESEM_PUBKEY``). Defended when the client refuses to pin
  that key and the fake decrypts nothing.
* ``A5 swapped link``: ``nobody``'s link (in a sticky directory, like ``/tmp``) points
  at the real service's directory; it is swapped to ``nobody``'s fake directory. The
  third user's client, pointed through the link, must refuse it (the link is never
  followed, so it makes no difference where it points).

All three are the one rule of ``esem.trusted_path``, which service and client share.
Legacy semaphores have no service files: ``n/a``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from esem.api import O_CREAT, USE_ESEM, sem_open
from esem.attack.a5_impersonator import FakeLog, _in_child, _read_child, protocol_fake
from esem.attack.base import Outcome, Target
from esem.errors import EsemError
from esem.paths import SOCKET_NAME, pubkey_path
from esem.protocol.crypto import generate_static_key, public_key_of
from esem.safe_text import printable

PLANTED_LABEL = "A5 planted link"
FOREIGN_LABEL = "A5 foreign socket dir"
SWAPPED_LABEL = "A5 swapped link"
FAKE_WAIT = 3.0  # seconds a fake waits for a victim (the defended victim never comes)
SECRET = b"root only: not the service's to touch\n"
THIRD_UID = 424244  # the victim: a uid with no account, neither root nor nobody


def _fake_service(directory: Path, private: bytes, *, make_dir: bool
                  ) -> Callable[[Callable[[], None]], dict[str, object]]:
    """As the attacker: (make ``directory``,) publish its own key and serve the real
    protocol on ``directory/esem.sock`` for one victim."""

    def body(ready: Callable[[], None]) -> dict[str, object]:
        if make_dir:
            directory.mkdir(mode=0o755)
        path = directory / SOCKET_NAME
        pubkey_path(path).write_text(public_key_of(private).hex() + "\n")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            os.chmod(path, 0o666)
            listener.listen(1)
            listener.settimeout(FAKE_WAIT)
            ready()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return {"connected": False, "requests": []}
            log = FakeLog()
            with conn:
                conn.settimeout(FAKE_WAIT)
                protocol_fake(private)(conn, log)
        return {"connected": True, "requests": log.requests}

    return body


def _victim(sock: Path) -> Callable[[Callable[[], None]], dict[str, object]]:
    """A client pointed at ``sock`` by ESEM_SOCKET, pinning whatever key is published
    there; the semaphore is created at 0, so a returned wait is a fake's grant."""

    def body(ready: Callable[[], None]) -> dict[str, object]:
        from esem.client import blocking

        for var in ("ESEM_PUBKEY", "ESEM_DIR", "ESEM_SWITCHLESS"):
            os.environ.pop(var, None)
        os.environ["ESEM_SOCKET"] = str(sock)
        blocking._process_client = None
        try:
            sem = sem_open(f"/esem-a5f-{secrets.token_hex(4)}", O_CREAT, 0o600, 0,
                           flags=USE_ESEM)
            sem.wait()
            return {"accepted": f"sem_open returned {sem!r} and a wait at value 0 returned"}
        except EsemError as exc:
            return {"refused": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        finally:
            if blocking._process_client is not None:
                blocking._process_client.close()

    return body


def _sticky(work: Path) -> Path:
    """A world-writable sticky directory of root's, as /tmp is."""
    path = work / "sticky"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o1777)
    return path


def _as_nobody(nobody: pwd.struct_passwd, action: Callable[[], None]) -> dict[str, object]:
    def body(ready: Callable[[], None]) -> dict[str, object]:
        action()
        return {"done": True}

    pid, fd = _in_child(nobody.pw_uid, nobody.pw_gid, body)
    return _read_child(pid, fd, FAKE_WAIT)


def planted_link(work: Path, nobody: pwd.struct_passwd) -> Outcome:
    secret = work / "root-only"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    theirs = _sticky(work) / "sock"
    link = theirs / (SOCKET_NAME + ".pub.tmp")

    def plant() -> None:
        theirs.mkdir(mode=0o755)
        link.symlink_to(secret)

    planted = _as_nobody(nobody, plant)
    if planted != {"done": True}:
        return Outcome(PLANTED_LABEL, "esem", "broken", f"the attacker failed: {planted}")
    state = work / "state"
    cmd = [sys.executable, "-m", "esem", "serve", "--dir", str(state),
           "--socket", str(theirs / SOCKET_NAME)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        if pubkey_path(theirs / SOCKET_NAME).exists():
            break  # it started there (the old behaviour): the damage is done
        time.sleep(0.02)
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = (proc.stdout.read() if proc.stdout else b"").decode(errors="replace").splitlines()
    said = printable(lines[-1].strip() if lines else "", limit=300)
    st = secret.stat()
    intact = secret.read_bytes() == SECRET and stat.S_IMODE(st.st_mode) == 0o600
    what = (f"uid {nobody.pw_uid} made the socket dir and planted {link.name} -> a root-only "
            "0600 file; root ran esem serve there")
    after = (f"the file kept its {len(SECRET)} bytes and mode 0600" if intact else
             f"the file now holds {secret.read_bytes()[:80]!r} with mode "
             f"{stat.S_IMODE(st.st_mode):04o}")
    paths = f"(socket dir {theirs}, file {secret})"
    if intact and proc.returncode == 3:
        return Outcome(PLANTED_LABEL, "esem", "defended",
                       f"{what}: {after}; it refused to start (exit 3: {said}) {paths}")
    return Outcome(PLANTED_LABEL, "esem", "broken",
                   f"{what}: {after}; exit {proc.returncode} ({said}) {paths}")


def _judge(label: str, what: str, paths: str, seen: dict[str, object],
           fake: dict[str, object]) -> Outcome:
    fake_saw = (f"the fake {'was connected to' if fake.get('connected') else 'saw no client'}"
                f" and decrypted {fake.get('requests')}")
    if "refused" in seen and not fake.get("requests"):
        return Outcome(label, "esem", "defended",
                       f"{what}: refused, {fake_saw}: {seen['refused']} {paths}")
    if "accepted" in seen:
        return Outcome(label, "esem", "broken",
                       f"{what}: accepted, {fake_saw}: {seen['accepted']} {paths}")
    return Outcome(label, "esem", "broken", f"{what}: the victim failed: {seen}; {fake_saw} "
                   f"{paths}")


def foreign_dir(work: Path, nobody: pwd.struct_passwd, private: bytes) -> Outcome:
    theirs = _sticky(work) / "theirs"
    f_pid, f_fd = _in_child(nobody.pw_uid, nobody.pw_gid,
                            _fake_service(theirs, private, make_dir=True))
    up = _read_child(f_pid, f_fd, FAKE_WAIT, ready_only=True)
    if "ready" not in up:
        return Outcome(FOREIGN_LABEL, "esem", "broken", f"the fake failed: {up}")
    v_pid, v_fd = _in_child(THIRD_UID, THIRD_UID, _victim(theirs / SOCKET_NAME))
    seen = _read_child(v_pid, v_fd, FAKE_WAIT * 2)
    fake = _read_child(f_pid, f_fd, FAKE_WAIT * 2)
    what = (f"uid {nobody.pw_uid} runs a protocol-speaking fake with its own {SOCKET_NAME}.pub "
            f"in a directory it owns; a client of uid {THIRD_UID} pointed there (ESEM_SOCKET, "
            "no ESEM_PUBKEY)")
    return _judge(FOREIGN_LABEL, what, f"(directory {theirs})", seen, fake)


def swapped_link(work: Path, nobody: pwd.struct_passwd, private: bytes,
                 real_dir: Path) -> Outcome:
    sticky = _sticky(work)
    link, theirs = sticky / "esem-link", sticky / "theirs"
    made = _as_nobody(nobody, lambda: link.symlink_to(real_dir))
    if made != {"done": True}:
        return Outcome(SWAPPED_LABEL, "esem", "broken", f"the attacker failed: {made}")
    v_pid, v_fd = _in_child(THIRD_UID, THIRD_UID, _victim(link / SOCKET_NAME))
    before = _read_child(v_pid, v_fd, FAKE_WAIT * 2)
    f_pid, f_fd = _in_child(nobody.pw_uid, nobody.pw_gid,
                            _fake_service(theirs, private, make_dir=True))
    up = _read_child(f_pid, f_fd, FAKE_WAIT, ready_only=True)
    if "ready" not in up:
        return Outcome(SWAPPED_LABEL, "esem", "broken", f"the fake failed: {up}")

    def swap() -> None:
        new = sticky / "esem-link.new"
        new.symlink_to(theirs)
        os.replace(new, link)

    swapped = _as_nobody(nobody, swap)
    v_pid, v_fd = _in_child(THIRD_UID, THIRD_UID, _victim(link / SOCKET_NAME))
    seen = _read_child(v_pid, v_fd, FAKE_WAIT * 2)
    fake = _read_child(f_pid, f_fd, FAKE_WAIT * 2)
    shown = {k: v for k, v in before.items() if k in ("refused", "accepted")} or before
    what = (f"uid {nobody.pw_uid} swapped its link from the real service's directory to its "
            f"own fake's; a client of uid {THIRD_UID} through the link")
    paths = (f"(link {link}; before the swap, to {real_dir}: {shown}; after, to {theirs}: "
             f"{'swapped' if swapped == {'done': True} else swapped})")
    return _judge(SWAPPED_LABEL, what, paths, seen, fake)


def run_legacy() -> list[Outcome]:
    return [Outcome(label, "legacy", "n/a",
                    "legacy semaphores have no service files to steer: no published key to "
                    "pin and no socket to replace; /dev/shm/sem.NAME is guarded by its mode "
                    "alone (A1, A3)")
            for label in (PLANTED_LABEL, FOREIGN_LABEL, SWAPPED_LABEL)]


def run(target: Target) -> list[Outcome]:
    legacy = run_legacy()
    if os.geteuid() != 0:
        return [Outcome(label, "esem", "n/a", "needs root to play two uids")
                for label in (PLANTED_LABEL, FOREIGN_LABEL, SWAPPED_LABEL)] + legacy
    nobody = pwd.getpwnam("nobody")
    private = generate_static_key()
    work = target.workdir / f"a5f-{secrets.token_hex(4)}"
    rows: list[Outcome] = []
    try:
        plays: list[Callable[[Path], Outcome]] = [
            lambda w: planted_link(w, nobody),
            lambda w: foreign_dir(w, nobody, private),
            lambda w: swapped_link(w, nobody, private, target.socket_path.parent),
        ]
        for i, play in enumerate(plays):
            here = work / str(i)
            here.mkdir(mode=0o755, parents=True)
            os.chmod(work, 0o755)
            rows.append(play(here))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows + legacy
