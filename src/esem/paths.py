"""Where the service lives: socket path, state directory, pinned public key.

Resolution order, the same for the daemon and every client: explicit argument, then the
environment (``ESEM_SOCKET``, ``ESEM_DIR``, ``ESEM_PUBKEY``), then the default directory:
``/run/esem`` for root, ``$XDG_RUNTIME_DIR/esem`` otherwise (``/tmp/esem-UID`` when
``XDG_RUNTIME_DIR`` is unset).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


def check_published_key(sock: Path, *, default_location: bool) -> None:
    """Refuse a published key that someone other than its rightful writer could have put
    there (adversary A5 squatting a path). The key file and its directory must be
    writable by their owner only; at the default location (which a client did not
    choose, and which under /tmp anyone could create first) the directory must also
    belong to root or to this user. Raises ``ValueError`` saying what is wrong."""
    key = pubkey_path(sock)
    d = os.stat(sock.parent)
    k = os.lstat(key)
    if not stat.S_ISREG(k.st_mode):
        raise ValueError(f"{key} is not a regular file")
    for path, st in ((sock.parent, d), (key, k)):
        if st.st_mode & 0o022:
            raise ValueError(f"{path} is writable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); not trusting its key")
    trusted = {0, os.geteuid()}
    if default_location and d.st_uid not in trusted:
        raise ValueError(f"{sock.parent} belongs to uid {d.st_uid}, not to root or to this "
                         "user; set ESEM_SOCKET (and ESEM_PUBKEY) to reach your service")
    if k.st_uid not in trusted | {d.st_uid}:
        raise ValueError(f"{key} belongs to uid {k.st_uid}, not to the owner of "
                         f"{sock.parent}")


def read_pubkey(sock: Path, explicit: bytes | str | None = None, *,
                default_location: bool = False) -> bytes:
    """The service key a client pins: argument, ``ESEM_PUBKEY`` (hex), or the file
    published beside the socket (checked by ``check_published_key``). Raises
    ``FileNotFoundError``/``ValueError``."""
    raw: bytes | str | None = explicit if explicit is not None else os.environ.get("ESEM_PUBKEY")
    if raw is None:
        check_published_key(sock, default_location=default_location)
        raw = pubkey_path(sock).read_text().strip()
    if isinstance(raw, str):
        raw = bytes.fromhex(raw.strip())
    if len(raw) != 32:
        raise ValueError(f"service public key must be 32 bytes, got {len(raw)}")
    return raw
