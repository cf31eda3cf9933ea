"""``esem serve``: the daemon around the Service - key, socket, signals, event loop.

Start-up is careful about the files it owns. Every directory it uses (the state
directory, the socket's directory) must pass the one rule of ``esem.trusted_path``
(no link anywhere on the path, every component owned by root or by the service, none
writable by another user), the rule clients apply before they pin the published key.
Every file is created relative to the checked directory's descriptor, without following
links (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode set with ``fchmod``): the static key
(created once, mode 0600, refused if anyone else could read it), the public key
published beside the socket (written to a temporary name, renamed into place) and the
socket itself (bound inside that directory with its final mode, refused if a live
service answers on it, replaced if it is a stale leftover, never silently taken over if
it is not a socket at all).

Then the process hardens itself: it is non-dumpable from the start (no core dump, no
ptrace or ``/proc/PID/mem`` by its own uid), may drop to ``--user`` once the key is read
and the socket bound, and tells systemd it is ready (``Type=notify``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from esem.core import Quotas
from esem.paths import KEY_NAME, pubkey_path
from esem.protocol.crypto import KEY_BYTES, generate_static_key, public_key_of
from esem.server.journal import Journal, JournalError
from esem.server.journal import load as load_journal
from esem.server.service import Service
from esem.trusted_path import UntrustedPath, check_entry, open_trusted_dir, proc_path

log = logging.getLogger("esem.server")


# Pending connections the kernel queues for us (capped by net.core.somaxconn): deep, so
# a tenant's connection storm cannot fill it for everyone (adversary A7).
LISTEN_BACKLOG = 4096

_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4  # <linux/prctl.h>
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class ServeConfig:
    state_dir: Path
    socket_path: Path
    quotas: Quotas = field(default_factory=Quotas)
    socket_mode: int = 0o666  # every local uid may connect; semaphores carry their own modes
    switchless: bool = False  # offer sessions the shared-memory fast path (switchless.py)
    user: str | None = None  # drop to this user once the key is read and the socket bound
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics on (metrics.py)
    resume_grace: float = 5.0  # seconds a detached session waits for RESUME (0: none)
    journal_dir: Path | None = None  # where the journal lives (None: in memory only)
    fsync: bool = False  # fsync the journal before replies (group commit per loop turn)


# -- hardening ---------------------------------------------------------------------------


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result: int = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                             ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def make_non_dumpable() -> None:
    """No core dump, and no ptrace or ``/proc/PID/mem`` by a process of the same uid
    (which the service becomes after ``--user``): its memory holds the private key and
    every semaphore. Checked, not assumed."""
    try:
        _prctl(_PR_SET_DUMPABLE, 0)
        dumpable = _prctl(_PR_GET_DUMPABLE)
    except (OSError, AttributeError) as exc:
        raise StartupError(f"cannot make the service non-dumpable: {exc}") from exc
    if dumpable != 0:
        raise StartupError(f"the service is still dumpable ({dumpable}) after prctl")


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int


def resolve_user(name: str) -> ServiceUser:
    """The user ``--user`` names; refused before anything is created if it does not
    exist or if this process could not become it."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StartupError(f"--user {name}: no such user (create it, e.g. useradd "
                           "--system --no-create-home --shell /usr/sbin/nologin "
                           f"{name})") from None
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise StartupError(f"--user {name}: only root can switch to another user "
                           f"(this is uid {os.geteuid()})")
    return ServiceUser(name, entry.pw_uid, entry.pw_gid)


def drop_privileges(user: ServiceUser) -> None:
    """Become ``user`` for good: no supplementary groups (the service needs none: peers'
    rights come from their own credentials), real, effective and saved ids all
    changed, verified by failing to get root back."""
    if os.geteuid() != 0:
        return  # already this user (resolve_user allowed nothing else)
    os.setgroups([])
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise StartupError(f"could not become user {user.name}")
    if user.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise StartupError(f"after dropping to {user.name} the service got root back")
    make_non_dumpable()  # a change of credentials may reset it (fs.suid_dumpable)
    log.info("running as user %s (uid %d, gid %d)", user.name, user.uid, user.gid)


class Notifier:
    """systemd's readiness protocol (``Type=notify``): datagrams such as ``READY=1`` to
    the AF_UNIX socket named by ``$NOTIFY_SOCKET``. A few lines, not a dependency: the
    protocol is one ``sendto``. The socket is connected at start-up, before ``--user``
    drops the rights that reaching it may need."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        addr = os.environ.pop("NOTIFY_SOCKET", "")
        if not addr:
            return
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        elif not addr.startswith("/"):
            log.warning("ignoring NOTIFY_SOCKET=%r: not an AF_UNIX address", addr)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot reach NOTIFY_SOCKET {addr!r}: {exc}") from exc
        self._sock = sock

    def send(self, state: str) -> None:
        if self._sock is not None:
            try:
                self._sock.send(state.encode())
            except OSError as exc:
                log.warning("systemd notification %r failed: %s", state, exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- the service's files -----------------------------------------------------------------


def open_service_dir(path: Path) -> int:
    """An ``O_PATH`` descriptor of ``path`` (created 0755 if missing) once it passed the
    trusted-path rule for this service's uid."""
    try:
        return open_trusted_dir(path, create_mode=0o755)
    except UntrustedPath as exc:
        raise StartupError(f"refusing {path}: {exc}") from None
    except OSError as exc:
        raise StartupError(f"cannot use {path}: {exc}") from None


def load_or_create_key(dir_fd: int, state_dir: Path) -> bytes:
    """The service's static X25519 private key, created on first start (mode 0600)."""
    path = state_dir / KEY_NAME
    try:
        fd = os.open(KEY_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600,
                     dir_fd=dir_fd)
    except FileExistsError:
        return _read_key(dir_fd, path)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # exactly, whatever the umask
        key = generate_static_key()
        f.write(key)
        f.flush()
        os.fsync(fd)
    log.info("created service key %s", path)
    return key


def _read_key(dir_fd: int, path: Path) -> bytes:
    try:
        fd = os.open(KEY_NAME, os.O_RDONLY | os.O_NONBLOCK | _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StartupError(f"{path} is a symbolic link; refusing it") from None
        raise StartupError(f"cannot read {path}: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise StartupError(
                f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "chmod 600 it or remove it to make a new key"
            )
        if st.st_uid != os.geteuid():
            raise StartupError(f"{path} belongs to uid {st.st_uid}, not to this service")
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise StartupError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key")
    return key


def publish_pubkey(dir_fd: int, sock_path: Path, private: bytes) -> Path:
    """Write ``SOCKET.pub`` (mode 0644) beside the socket: a fresh file under a
    temporary name, never one that was already there (a link planted at that name is
    removed, not followed), then renamed over the published name."""
    path = pubkey_path(sock_path)
    tmp = path.name + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # a leftover of a crash; unlink never follows
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o644,
                 dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o644)
        f.write((public_key_of(private).hex() + "\n").encode())
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return path


def claim_socket(dir_fd: int, path: Path) -> None:
    """Make ``path`` (in the directory ``dir_fd``) free for bind: refuse if a live
    service answers there, remove a stale socket, refuse anything that is not a
    socket."""
    try:
        st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(proc_path(dir_fd, path.name))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot probe {path}: {exc}") from exc
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=dir_fd)
        return
    finally:
        probe.close()
    raise StartupError(f"another esem service is live on {path}")


def bind_socket(dir_fd: int, path: Path, mode: int) -> tuple[socket.socket, int]:
    """A listening socket bound at ``path`` inside the checked directory ``dir_fd``
    (through ``/proc/self/fd``, so the name is resolved in that very directory), born
    with ``mode`` (the umask is set for the bind: no window with a wider mode, and no
    chmod by name afterwards). Returns it and the inode it made."""
    if not os.path.isdir(f"/proc/self/fd/{dir_fd}"):
        raise StartupError("/proc is not mounted: the socket is bound through "
                           "/proc/self/fd, inside the directory that was checked")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(proc_path(dir_fd, path.name))
        finally:
            os.umask(old_umask)
        st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        check_entry(st, path, stat.S_IFSOCK)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock, st.st_ino


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def raise_fd_limit() -> None:
    """Every session is a descriptor: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(config: ServeConfig, ready: asyncio.Event | None = None) -> None:
    make_non_dumpable()
    user = resolve_user(config.user) if config.user else None
    if config.metrics is not None:  # refuse before anything is created or bound
        from esem.server.metrics import MetricsUnavailable, _require

        try:
            _require()
        except MetricsUnavailable as exc:
            raise StartupError(str(exc)) from None
    notifier = Notifier()
    raise_fd_limit()
    state_fd = open_service_dir(config.state_dir)
    try:
        socket_fd = open_service_dir(config.socket_path.parent)
    except BaseException:
        os.close(state_fd)
        raise
    journal: Journal | None = None
    try:
        try:
            private = load_or_create_key(state_fd, config.state_dir)
            try:
                service = Service(private, config.quotas, resume_grace=config.resume_grace)
                if config.switchless:
                    from esem.server.switchless import service_rings

                    service_rings(service.codec)
            except (ValueError, RuntimeError) as exc:  # ESEM_SERVICE_CODEC, _RINGS
                raise StartupError(str(exc)) from None
            # Before the socket is bound and the key published: a journal that does not
            # verify stops the start-up with nothing announced.
            if config.journal_dir is not None:
                journal = _open_journal(config, service, private)
            claim_socket(socket_fd, config.socket_path)
            listener, sock_ino = bind_socket(socket_fd, config.socket_path,
                                             config.socket_mode)
        except UntrustedPath as exc:
            raise StartupError(f"refusing {config.socket_path}: {exc}") from None
        try:
            publish_pubkey(socket_fd, config.socket_path, private)
        except BaseException:
            listener.close()
            raise
    except BaseException:
        os.close(socket_fd)
        if journal is not None:
            journal.close()
        raise
    finally:
        os.close(state_fd)
    try:
        await _run(config, service, listener, socket_fd, sock_ino, user, notifier, ready)
    finally:
        if journal is not None:
            journal.close()
        os.close(socket_fd)
        notifier.close()


def _open_journal(config: ServeConfig, service: Service, private: bytes) -> Journal:
    """Restore the service from its journal (refusing a journal that does not verify or
    replay, never starting empty over it), then begin a new journal file from the
    restored state."""
    assert config.journal_dir is not None
    where = config.journal_dir
    dir_fd = open_service_dir(where)
    started = time.monotonic()
    try:
        loaded = load_journal(dir_fd, private)
        if loaded is not None:
            service.restore(loaded.snapshot, loaded.records)
    except (JournalError, ValueError) as exc:
        os.close(dir_fd)
        raise StartupError(f"the journal in {where} cannot be used: {exc}. Refusing to start "
                           "over it; move it away (and its .head) to start empty") from None
    journal = Journal(dir_fd, private, fsync=config.fsync)
    if loaded is not None:
        journal.resume_at(loaded.last_seq)
    journal.start(service.snapshot_state())
    service.journal = journal
    stats = service.table.statistics()
    if loaded is not None:
        log.info("restored %d semaphores and %d sessions from the journal in %s (%d records%s)"
                 " in %.3f s", stats["semaphores"], stats["sessions"], where,
                 len(loaded.records), f", a torn last record of {loaded.torn} bytes ignored"
                 if loaded.torn else "", time.monotonic() - started)
    else:
        log.info("new journal in %s%s", where, " (fsync)" if config.fsync else "")
    return journal


async def _run(config: ServeConfig, service: Service, listener: socket.socket, socket_fd: int,
               sock_ino: int, user: ServiceUser | None, notifier: Notifier,
               ready: asyncio.Event | None) -> None:
    private = service._static_private
    service.start_restored()
    if config.switchless:
        from esem.server.switchless import enable

        enable(service)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(service.protocol_factory, sock=listener,
                                           backlog=LISTEN_BACKLOG)
    metrics = None
    if config.metrics is not None:  # bound before --user drops rights a low port needs
        from esem.server.metrics import MetricsUnavailable
        from esem.server.metrics import enable as enable_metrics

        try:
            metrics = enable_metrics(service, config.metrics, loop)
        except (MetricsUnavailable, OSError) as exc:
            server.close()
            _remove_socket(socket_fd, config.socket_path, sock_ino)
            raise StartupError(f"metrics on {config.metrics}: {exc}") from exc
    if user is not None:
        drop_privileges(user)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "esem service listening on %s (key %s, loop %s, codec %s%s)",
        config.socket_path, public_key_of(private).hex()[:16], type(loop).__module__,
        service.codec, ", switchless" if config.switchless else "",
    )
    notifier.send(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=listening on {config.socket_path}")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("esem service stopping")
        notifier.send("STOPPING=1")
        if metrics is not None:
            metrics.stop()
        server.close()
        service.close_all()
        await server.wait_closed()
        _remove_socket(socket_fd, config.socket_path, sock_ino)


def _remove_socket(dir_fd: int, path: Path, ino: int) -> None:
    try:
        if os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_ino == ino:  # ours
            os.unlink(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        # After --user the directory (root's) is no longer writable by the service: the
        # socket stays behind, refusing connections, and the next start removes it.
        log.info("leaving %s behind (no longer allowed to remove it)", path)


def serve(config: ServeConfig) -> None:
    """Run the service in the foreground until SIGTERM or SIGINT."""
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve(config))
    finally:
        loop.close()
