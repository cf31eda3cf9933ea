"""``esem serve``: the daemon around the Service - key, socket, signals, event loop.

Start-up is careful about the two files it owns: the static key (created once, mode
0600, refused if anyone else could read it) and the socket (refused if a live service
answers on it, replaced if it is a stale leftover, never silently taken over if it is
not a socket at all). The public key is published beside the socket for clients to pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from esem.core import Quotas
from esem.paths import KEY_NAME, pubkey_path
from esem.protocol.crypto import KEY_BYTES, generate_static_key, public_key_of
from esem.server.service import Service

log = logging.getLogger("esem.server")


# Pending connections the kernel queues for us (capped by net.core.somaxconn): deep, so
# a tenant's connection storm cannot fill it for everyone (adversary A7).
LISTEN_BACKLOG = 4096


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class ServeConfig:
    state_dir: Path
    socket_path: Path
    quotas: Quotas = field(default_factory=Quotas)
    socket_mode: int = 0o666  # every local uid may connect; semaphores carry their own modes
    switchless: bool = False  # offer sessions the shared-memory fast path (switchless.py)
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics on (metrics.py)


def load_or_create_key(state_dir: Path) -> bytes:
    """The service's static X25519 private key, created on first start (mode 0600)."""
    path = state_dir / KEY_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"{path} is not a regular file") from None
        if st.st_mode & 0o077:
            raise StartupError(
                f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "chmod 600 it or remove it to make a new key"
            ) from None
        if st.st_uid != os.geteuid():
            raise StartupError(
                f"{path} belongs to uid {st.st_uid}, not to this service"
            ) from None
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise StartupError(
                f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key"
            ) from None
        return key
    key = generate_static_key()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    log.info("created service key %s", path)
    return key


def publish_pubkey(sock_path: Path, private: bytes) -> Path:
    path = pubkey_path(sock_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(public_key_of(private).hex() + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def claim_socket(path: Path) -> None:
    """Make ``path`` free for bind: refuse if a live service answers there, remove a
    stale socket, refuse anything that is not a socket."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot probe {path}: {exc}") from exc
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartupError(f"another esem service is live on {path}")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def check_state_dir(path: Path) -> None:
    """The directory that holds the key and the published public key must be ours and
    writable by no one else: whoever could write there could swap the key clients pin."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise StartupError(f"{path} belongs to uid {st.st_uid}, not to this service "
                           f"(uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise StartupError(f"{path} is writable by others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); chmod 755 it")


def raise_fd_limit() -> None:
    """Every session is a descriptor: use all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(config: ServeConfig, ready: asyncio.Event | None = None) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    check_state_dir(config.state_dir)
    raise_fd_limit()
    private = load_or_create_key(config.state_dir)
    config.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    claim_socket(config.socket_path)
    service = Service(private, config.quotas)
    if config.switchless:
        from esem.server.switchless import enable

        enable(service)
    loop = asyncio.get_running_loop()
    metrics = None
    if config.metrics is not None:
        from esem.server.metrics import MetricsUnavailable
        from esem.server.metrics import enable as enable_metrics

        try:
            metrics = enable_metrics(service, config.metrics, loop)
        except (MetricsUnavailable, OSError) as exc:
            raise StartupError(f"metrics on {config.metrics}: {exc}") from exc
    old_umask = os.umask(0o177)  # no window in which the socket has a wider mode
    try:
        server = await loop.create_unix_server(
            service.protocol_factory, str(config.socket_path), backlog=LISTEN_BACKLOG
        )
    finally:
        os.umask(old_umask)
    os.chmod(config.socket_path, config.socket_mode)
    sock_ino = os.stat(config.socket_path).st_ino
    publish_pubkey(config.socket_path, private)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "esem service listening on %s (key %s, loop %s%s)",
        config.socket_path, public_key_of(private).hex()[:16], type(loop).__module__,
        ", switchless" if config.switchless else "",
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("esem service stopping")
        if metrics is not None:
            metrics.stop()
        server.close()
        service.close_all()
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(config.socket_path).st_ino == sock_ino:  # still ours
                config.socket_path.unlink()


def serve(config: ServeConfig) -> None:
    """Run the service in the foreground until SIGTERM or SIGINT."""
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve(config))
    finally:
        loop.close()
