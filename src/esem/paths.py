"""Where the service lives: socket path, state directory, pinned public key.

Resolution order, the same for the daemon and every client: explicit argument, then the
environment (``ESEM_SOCKET``, ``ESEM_DIR``, ``ESEM_PUBKEY``), then the default directory:
``/run/esem`` for root, ``$XDG_RUNTIME_DIR/esem`` otherwise (``/tmp/esem-UID`` when
``XDG_RUNTIME_DIR`` is unset).
"""

from __future__ import annotations

import os
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


def read_pubkey(sock: Path, explicit: bytes | str | None = None) -> bytes:
    """The service key a client pins: argument, ``ESEM_PUBKEY`` (hex), or the file
    published beside the socket. Raises ``FileNotFoundError``/``ValueError``."""
    raw: bytes | str | None = explicit if explicit is not None else os.environ.get("ESEM_PUBKEY")
    if raw is None:
        raw = pubkey_path(sock).read_text().strip()
    if isinstance(raw, str):
        raw = bytes.fromhex(raw.strip())
    if len(raw) != 32:
        raise ValueError(f"service public key must be 32 bytes, got {len(raw)}")
    return raw
