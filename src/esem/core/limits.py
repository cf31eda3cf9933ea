"""Value and name limits of POSIX named semaphores, and their validation.

Shared by the core (which must never trust its input) and the client (which reports bad
arguments before anything reaches the wire).
"""

from __future__ import annotations

from esem.core.status import CoreError, Status

SEM_VALUE_MAX = 2**31 - 1  # glibc's SEM_VALUE_MAX: the count is a signed 32-bit int
# Linux NAME_MAX (255) less the "sem." prefix glibc adds in /dev/shm; counted in bytes.
MAX_NAME_BYTES = 251
KEY_MIN_BYTES = 16  # shortest key-binding key: 128 bits
KEY_MAX_BYTES = 32  # longest: the BLAKE2s key size


def check_name(name: str) -> bytes:
    """Return the UTF-8 name, or raise ``CoreError`` saying what is wrong with it."""
    if not isinstance(name, str):
        raise CoreError(Status.EINVAL, f"semaphore name must be str, not {type(name).__name__}")
    if not name.startswith("/"):
        raise CoreError(Status.EINVAL, f"semaphore name {name!r} must start with '/'")
    if "/" in name[1:]:
        raise CoreError(Status.EINVAL, f"semaphore name {name!r} may contain only one '/'")
    if len(name) == 1:
        raise CoreError(Status.EINVAL, "semaphore name must have characters after '/'")
    if "\0" in name:
        raise CoreError(Status.EINVAL, f"semaphore name {name!r} contains a NUL byte")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CoreError(Status.EINVAL, f"semaphore name {name!r} is not valid UTF-8") from exc
    if len(raw) - 1 > MAX_NAME_BYTES:
        raise CoreError(
            Status.ENAMETOOLONG,
            f"semaphore name is {len(raw) - 1} bytes after '/', at most {MAX_NAME_BYTES}",
        )
    return raw


def check_value(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CoreError(Status.EINVAL, f"initial value must be int, not {type(value).__name__}")
    if not 0 <= value <= SEM_VALUE_MAX:
        raise CoreError(Status.EINVAL, f"initial value {value} is outside 0..{SEM_VALUE_MAX}")


def check_key(key: bytes | None) -> None:
    if key is None:
        return
    if not isinstance(key, bytes | bytearray):
        raise CoreError(Status.EINVAL, f"key must be bytes, not {type(key).__name__}")
    if not KEY_MIN_BYTES <= len(key) <= KEY_MAX_BYTES:
        raise CoreError(
            Status.EINVAL,
            f"key is {len(key)} bytes; a key-binding key has {KEY_MIN_BYTES} to "
            f"{KEY_MAX_BYTES} bytes",
        )
