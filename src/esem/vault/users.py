"""The vault's users: a JSON file of scrypt password hashes, and verification.

``users.json`` (mode 0600, replaced atomically) maps a user name to its scrypt
parameters, salt and hash. Verification recomputes scrypt and lets ``cryptography``
compare in constant time; an unknown user costs the same scrypt run against a dummy
entry, and both failures raise the same ``AuthFailed`` with the same message, so neither
the answer nor its timing says which names exist. The file is re-read at every login, so
``esem vault adduser`` takes effect on a running server.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from esem.vault.errors import AuthFailed
from esem.vault.limits import (
    MAX_PASSWORD_BYTES,
    MAX_USER_CHARS,
    MIN_PASSWORD_CHARS,
    SCRYPT_HASH_BYTES,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    SCRYPT_SALT_BYTES,
)
from esem.vault.storage import atomic_write

USERS_NAME = "users.json"
FORMAT = "esem-vault-users"
_USER_RE = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_USER_CHARS}}}")
AUTH_FAILED_MESSAGE = "authentication failed: unknown user or wrong password"


@dataclass(frozen=True)
class Entry:
    n: int
    r: int
    p: int
    salt: bytes
    hash: bytes


def check_user_name(name: str) -> str:
    if not _USER_RE.fullmatch(name):
        raise ValueError(f"user name {name!r} must be 1-{MAX_USER_CHARS} characters of "
                         "letters, digits, '_', '.', '-'")
    return name


def check_password(password: str, *, new: bool = False) -> bytes:
    raw = password.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ValueError(f"password is longer than {MAX_PASSWORD_BYTES} bytes")
    if new and len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"password must be at least {MIN_PASSWORD_CHARS} characters")
    return raw


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=SCRYPT_HASH_BYTES, n=n, r=r, p=p)


def _load(path: Path) -> dict[str, Entry]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the users file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not an esem vault users file")
    users: dict[str, Entry] = {}
    try:
        for name, e in doc["users"].items():
            users[name] = Entry(int(e["n"]), int(e["r"]), int(e["p"]),
                                bytes.fromhex(e["salt"]), bytes.fromhex(e["hash"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} has a malformed entry: {exc!r}") from None
    return users


def add_user(directory: Path, name: str, password: str, *, replace: bool = False) -> None:
    """Add ``name`` (or, with ``replace``, change its password) in ``directory``."""
    check_user_name(name)
    raw = check_password(password, new=True)
    path = directory / USERS_NAME
    users = _load(path)
    if name in users and not replace:
        raise ValueError(f"user {name!r} already exists (use --replace to set a new password)")
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    users[name] = Entry(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt,
                        _derive(raw, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P).derive(raw))
    doc: dict[str, Any] = {"format": FORMAT, "version": 1, "users": {
        u: {"n": e.n, "r": e.r, "p": e.p, "salt": e.salt.hex(), "hash": e.hash.hex()}
        for u, e in sorted(users.items())}}
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=1).encode(), mode=0o600)


def user_names(directory: Path) -> list[str]:
    return sorted(_load(directory / USERS_NAME))


# A fixed entry with the current parameters: an unknown user is "verified" against it,
# so that a failure costs one scrypt run either way.
_DUMMY = Entry(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\0" * SCRYPT_SALT_BYTES, b"\0" * SCRYPT_HASH_BYTES)


def authenticate(directory: Path, name: object, password: object) -> str:
    """Return ``name`` if ``password`` is its password; else raise ``AuthFailed``."""
    if not isinstance(name, str) or not isinstance(password, str):
        raise AuthFailed(AUTH_FAILED_MESSAGE)
    try:
        raw = check_password(password)
    except ValueError:
        raise AuthFailed(AUTH_FAILED_MESSAGE) from None
    entry = _load(directory / USERS_NAME).get(name)
    known = entry is not None
    e = entry if entry is not None else _DUMMY
    try:
        _derive(raw, e.salt, e.n, e.r, e.p).verify(raw, e.hash)  # constant-time compare
    except InvalidKey:
        raise AuthFailed(AUTH_FAILED_MESSAGE) from None
    if not known:  # the dummy hash matches no password; belt and braces
        raise AuthFailed(AUTH_FAILED_MESSAGE)
    return name
