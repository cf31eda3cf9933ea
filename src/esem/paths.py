"""Where the service lives: socket path, state directory, pinned public key.

Resolution order, the same for the daemon and every client: explicit argument, then the
environment (``ESEM_SOCKET``, ``ESEM_DIR``, ``ESEM_PUBKEY``), then the default directory:
``/run/esem`` for root, ``$XDG_RUNTIME_DIR/esem`` otherwise (``/tmp/esem-UID`` when
``XDG_RUNTIME_DIR`` is unset).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from esem.trusted_path import UntrustedPath, check_entry, read_entry, trusted_dir

SOCKET_NAME = "esem.sock"
KEY_NAME = "service.key"
PUB_SUFFIX = ".pub"  # the public key is published beside the socket: esem.sock.pub


def default_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/esem")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "esem"
    return Path(f"/tmp/esem-{os.geteuid()}")


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("ESEM_DIR")
    return Path(env) if env else default_dir()


def socket_path(
    explicit: str | os.PathLike[str] | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> Path:
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("ESEM_SOCKET")
    if env:
        return Path(env)
    return state_dir(directory) / SOCKET_NAME


def pubkey_path(sock: Path) -> Path:
    return sock.with_name(sock.name + PUB_SUFFIX)


def is_default_location(explicit_socket: object = None) -> bool:
    """True when nobody chose the socket: no argument, no ESEM_SOCKET, no ESEM_DIR."""
    return explicit_socket is None and not (
        os.environ.get("ESEM_SOCKET") or os.environ.get("ESEM_DIR")
    )


def check_published_key(sock: Path, *, default_location: bool) -> bytes:
    """The public key published beside ``sock``, read only if nobody but root or this
    user could have put it there (adversary A5 steering the client through the
    filesystem): the socket's directory, every component above it, the ``.pub`` file
    and the socket itself must pass the rule of ``esem.trusted_path`` - the same rule
    the service applied when it created them. Returns the file's bytes; raises
    ``UntrustedPath`` (a ``ValueError``) saying what is wrong, or ``OSError``."""
    key = pubkey_path(sock)
    try:
        with trusted_dir(sock.parent) as dfd:
            data = read_entry(dfd, key.name, key)
            with contextlib.suppress(FileNotFoundError):  # connect() reports a missing one
                check_entry(os.stat(sock.name, dir_fd=dfd, follow_symlinks=False), sock,
                            stat.S_IFSOCK)
    except UntrustedPath as exc:
        if not default_location:
            raise
        raise UntrustedPath(f"{exc}; set ESEM_SOCKET (and ESEM_PUBKEY) to reach your "
                            "service") from None
    return data


def read_pubkey(sock: Path, explicit: bytes | str | None = None, *,
                default_location: bool = False) -> bytes:
    """The service key a client pins: argument, ``ESEM_PUBKEY`` (hex), or the file
    published beside the socket (checked by ``check_published_key``). Raises
    ``FileNotFoundError``/``ValueError``."""
    raw: bytes | str | None = explicit if explicit is not None else os.environ.get("ESEM_PUBKEY")
    if raw is None:
        raw = check_published_key(sock, default_location=default_location).decode(
            "ascii", "replace").strip()
    if isinstance(raw, str):
        raw = bytes.fromhex(raw.strip())
    if len(raw) != 32:
        raise ValueError(f"service public key must be 32 bytes, got {len(raw)}")
    return raw
