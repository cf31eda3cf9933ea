"""Who may have put a file there: the one rule for the service's files, for both ends.

The service (the state directory, the socket directory, the key, the published ``.pub``,
the socket) and every client (before it pins a published key) apply the same rule, here
and nowhere else. A checking user U is the effective uid of the process that checks (the
service before it drops to ``--user``, or the client). A directory is **trusted by U**
when every component of its path, from ``/`` down to it:

1. is not a symbolic link (none is followed, not even one owned by root);
2. is owned by root or by U;
3. is writable by group or others only if it is a sticky directory owned by root (like
   ``/tmp``): there, nobody else can rename or remove what U put in it. The directory
   itself, the one that holds the files, must be writable by its owner alone.

A file in it (the key, the ``.pub``, the socket) is trusted when it is not a link, is of
the expected type, is owned by root or by U and is writable by its owner alone.

Everything is checked on descriptors (``O_PATH | O_NOFOLLOW`` relative to the parent's
descriptor, then ``fstat``), so the answer is about what is opened, not about a name that
may change meanwhile; callers keep the directory's descriptor and create, read, rename
and bind relative to it. Another uid (not root) cannot steer any of it: it owns nothing
on the path and can write nowhere on it except sticky root directories, where it can
only add names of its own, which the next component's check refuses.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Collection, Iterator
from pathlib import Path

from esem.safe_text import printable

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedPath(ValueError):
    """A path, or a file on it, that someone other than root or the checking user could
    have put there or could change. The message says which component and why."""


def trusted_uids(uid: int | None = None) -> frozenset[int]:
    """Root and the checking user (the effective uid unless given)."""
    return frozenset({0, os.geteuid() if uid is None else uid})


def _who(uids: Collection[int]) -> str:
    others = sorted(set(uids) - {0})
    return "root" + "".join(f" or uid {u}" for u in others)


def _check_dir_stat(path: str, st: os.stat_result, uids: Collection[int],
                    *, last: bool) -> None:
    if st.st_uid not in uids:
        raise UntrustedPath(f"{path} belongs to uid {st.st_uid}, not to {_who(uids)} "
                            "(who checks it); another user could swap what is in it")
    if st.st_mode & 0o022:
        sticky_root = st.st_mode & stat.S_ISVTX and st.st_uid == 0
        if last or not sticky_root:
            raise UntrustedPath(f"{path} is writable by others (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it")


def _components(path: str | os.PathLike[str]) -> list[str]:
    # abspath only joins the current directory (whose name the kernel gives without
    # links) and folds "." and ".."; as no component may be a link, folding ".."
    # lexically names the same directory the kernel would reach.
    return [p for p in os.path.abspath(os.fspath(path)).split("/") if p]


def open_trusted_dir(path: str | os.PathLike[str], uids: Collection[int] | None = None,
                     *, create_mode: int | None = None) -> int:
    """Walk ``path`` from ``/`` component by component and return an ``O_PATH``
    descriptor of it once every component passed the rule (the caller closes it).

    ``create_mode``: create missing components with this mode (as the checking user,
    through the umask); they are then checked like the others. Raises
    ``UntrustedPath``, or ``FileNotFoundError``/``NotADirectoryError`` naming the
    component."""
    allowed = trusted_uids() if uids is None else frozenset(uids)
    names = _components(path)
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_dir_stat("/", os.fstat(fd), allowed, last=not names)
        here = ""
        for i, name in enumerate(names):
            here += "/" + name
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create_mode is None:
                    raise FileNotFoundError(errno.ENOENT, "no such directory", here) from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, create_mode, dir_fd=fd)
                nfd = _open_existing(fd, name, here)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                nfd = _open_existing(fd, name, here)
            os.close(fd)
            fd = nfd
            _check_dir_stat(here, os.fstat(fd), allowed, last=i == len(names) - 1)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_existing(parent: int, name: str, here: str) -> int:
    """Open ``name`` again, turning "it is a link" or "not a directory" into a clear
    error (O_NOFOLLOW reports a link as ELOOP or, with O_DIRECTORY, ENOTDIR)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = printable(os.readlink(name, dir_fd=parent), limit=200)  # theirs
            raise UntrustedPath(f"{here} is a symbolic link (to {target}); links are not "
                                "followed on the service's paths: name the real "
                                "directory") from None
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", here) from None


@contextlib.contextmanager
def trusted_dir(path: str | os.PathLike[str], uids: Collection[int] | None = None,
                *, create_mode: int | None = None) -> Iterator[int]:
    """``open_trusted_dir`` as a context manager that closes the descriptor."""
    fd = open_trusted_dir(path, uids, create_mode=create_mode)
    try:
        yield fd
    finally:
        os.close(fd)


def check_entry(st: os.stat_result, where: str | os.PathLike[str], kind: int,
                uids: Collection[int] | None = None) -> None:
    """The file rule for an entry of a trusted directory, on its (``fstat``/``lstat``)
    result: of type ``kind`` (``stat.S_IFREG``, ``stat.S_IFSOCK``), owned by root or the
    checking user, writable by its owner alone."""
    allowed = trusted_uids() if uids is None else frozenset(uids)
    if stat.S_IFMT(st.st_mode) != kind:
        what = {stat.S_IFREG: "a regular file", stat.S_IFSOCK: "a socket"}.get(kind, "")
        raise UntrustedPath(f"{where} is not {what or 'of the expected type'}")
    if st.st_uid not in allowed:
        raise UntrustedPath(f"{where} belongs to uid {st.st_uid}, not to "
                            f"{_who(allowed)} (who checks it)")
    if kind != stat.S_IFSOCK and st.st_mode & 0o022:
        raise UntrustedPath(f"{where} is writable by others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o})")


def read_trusted_file(directory: str | os.PathLike[str], name: str,
                      uids: Collection[int] | None = None, *, limit: int = 4096) -> bytes:
    """The bytes of ``directory/name`` once the directory and the file passed the rule,
    read from the very descriptor that was checked."""
    with trusted_dir(directory, uids) as dfd:
        return read_entry(dfd, name, Path(directory) / name, uids, limit=limit)


def read_entry(dir_fd: int, name: str, where: str | os.PathLike[str],
               uids: Collection[int] | None = None, *, limit: int = 4096) -> bytes:
    """Read the regular file ``name`` of the trusted directory ``dir_fd`` (no link
    followed, checked on its descriptor, at most ``limit`` bytes)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedPath(f"{where} is a symbolic link") from None
        raise
    try:
        check_entry(os.fstat(fd), where, stat.S_IFREG, uids)
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UntrustedPath(f"{where} is larger than {limit} bytes")
    return data


def proc_path(dir_fd: int, name: str) -> str:
    """A path naming ``name`` inside the directory behind ``dir_fd`` (for calls that take
    only a path, such as ``bind`` and ``connect`` of a Unix socket): through
    ``/proc/self/fd``, so the kernel resolves it in that very directory."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    return f"/proc/self/fd/{dir_fd}/{name}"
