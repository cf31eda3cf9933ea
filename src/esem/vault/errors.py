"""The vault's errors: one code on the wire, one exception class in Python.

The server answers a failed request with an ``ErrorCode`` and a message; the client
raises the matching ``VaultError`` subclass, so a caller can ``except NoSlot`` without
parsing text. They hang off ``EsemError``, the project's one exception tree, so that the
``esem`` command maps them to its exit statuses like every other refusal.
"""

from __future__ import annotations

from enum import StrEnum

from esem.errors import EsemError


class ErrorCode(StrEnum):
    AUTH_FAILED = "auth_failed"  # unknown user or wrong password (one opaque answer)
    NOT_AUTHENTICATED = "not_authenticated"  # a request before a successful auth
    BAD_REQUEST = "bad_request"  # a malformed frame or header
    BAD_NAME = "bad_name"  # empty, too long, control characters
    NOT_FOUND = "not_found"  # no such file (of this user)
    TOO_LARGE = "too_large"  # an upload over MAX_UPLOAD_BYTES
    VAULT_FULL = "vault_full"  # every TREE_SLOTS slot is taken
    NO_SLOT = "no_slot"  # the sealing engine refused a sixth concurrent entrant
    DISK_FULL = "disk_full"  # ENOSPC (or EDQUOT) while persisting: nothing was stored
    CORRUPT = "corrupt"  # a blob or the tree failed authentication or parsing
    SYNC_FAILED = "sync_failed"  # the semaphore backend failed (e.g. esem service gone)
    INTERNAL = "internal"  # anything else: logged by the server


class VaultError(EsemError):
    """A vault request failed; ``code`` says how."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AuthFailed(VaultError):
    code = ErrorCode.AUTH_FAILED


class NotAuthenticated(VaultError):
    code = ErrorCode.NOT_AUTHENTICATED


class BadRequest(VaultError, ValueError):
    code = ErrorCode.BAD_REQUEST


class BadName(VaultError, ValueError):
    code = ErrorCode.BAD_NAME


class NotFound(VaultError):
    code = ErrorCode.NOT_FOUND


class TooLarge(VaultError, ValueError):
    code = ErrorCode.TOO_LARGE


class VaultFull(VaultError):
    code = ErrorCode.VAULT_FULL


class NoSlot(VaultError):
    """The sealing engine had all its slots taken: more service threads entered than
    ``sem_service`` admits. With an honest semaphore this cannot happen."""

    code = ErrorCode.NO_SLOT


class DiskFull(VaultError):
    code = ErrorCode.DISK_FULL


class Corrupt(VaultError):
    """A blob or the file tree failed authentication or parsing: tampered, or written by
    racing writers. The vault never returns bytes it could not authenticate."""

    code = ErrorCode.CORRUPT


class SyncFailed(VaultError):
    code = ErrorCode.SYNC_FAILED


class VaultUnavailable(VaultError):
    """No vault server answers at the address (client side only)."""


class CertificateMismatch(VaultError):
    """The server's TLS certificate is not the pinned one (client side only)."""


class ProtocolViolation(VaultError):
    """The peer sent bytes that are not the vault protocol (client side only)."""


_BY_CODE: dict[ErrorCode, type[VaultError]] = {
    cls.code: cls
    for cls in (AuthFailed, NotAuthenticated, BadRequest, BadName, NotFound, TooLarge,
                VaultFull, NoSlot, DiskFull, Corrupt, SyncFailed)
}


def error_for(code: str, message: str) -> VaultError:
    """The exception for an error reply (an unknown code is a plain ``VaultError``)."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return VaultError(f"{code}: {message}")
    return _BY_CODE.get(known, VaultError)(message, known)
