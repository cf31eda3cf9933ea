"""Crash- and full-disk-safe file writes: temp file, fsync, rename, fsync the directory.

Every file the vault persists (the tree, a blob, the users file, the master key) goes
through ``atomic_write``: readers see the old content or the new, never a torn mix, and
a write that fails half-way (ENOSPC, EDQUOT, EFBIG, a crash) leaves the old file as it
was and removes its temporary file. A full disk becomes ``DiskFull`` with a message that
says nothing was stored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from esem.vault.errors import DiskFull

TEMP_PREFIX = ".tmp-"  # leftovers of a crash carry this prefix and are removed at start
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno in _FULL:
            raise DiskFull(f"the vault's disk is full ({errno.errorcode[exc.errno]} writing "
                           f"{path.name}): nothing was stored") from exc
        raise
    fsync_dir(path.parent)


def remove_temp_files(directory: Path) -> int:
    """Remove what interrupted writes left in ``directory``; return how many."""
    removed = 0
    for p in directory.glob(TEMP_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed
