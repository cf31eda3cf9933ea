"""Result codes of the trusted core, shared by the protocol and every client.

The wire carries these numbers, so they are fixed here rather than borrowed from the
platform's ``errno`` (whose values differ between systems). Each name is the errno a
POSIX implementation would report for the same condition.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    OK = 0
    ENOENT = 1  # no semaphore of that name (open without O_CREAT, unlink)
    EEXIST = 2  # O_CREAT|O_EXCL and the name exists
    EACCES = 3  # mode bits or ownership refuse the caller
    EAGAIN = 4  # trywait on a semaphore at zero
    ETIMEDOUT = 5  # a timed wait reached its deadline
    EOVERFLOW = 6  # post past SEM_VALUE_MAX
    EINVAL = 7  # malformed argument (value out of range, bad name, duplicate request id)
    EBADF = 8  # handle unknown to this session (never opened, closed, or not yours)
    ECANCELED = 9  # the wait was cancelled by its own session (signal, close)
    EKEYREJECTED = 10  # key-bound semaphore: missing or invalid MAC, or key mismatch
    EDQUOT = 11  # a quota of the caller's uid or session is exhausted
    ENAMETOOLONG = 12  # name longer than MAX_NAME_BYTES
    ESTALE = 13  # RESUME: the request's reply was lost across a service restart


class CoreError(Exception):
    """An operation the core refused; nothing in the table changed."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"CoreError({self.status.name}, {self.message!r})"
