"""Where the native code is, and running programs under the preload library.

The preload library (``libesem_preload.so``, built from ``native/esem-preload``) moves a
program's POSIX semaphores into the esem service without changing the program. It is
found, in order: ``$ESEM_PRELOAD_LIB``; inside the installed package
(``esem/_native/``, put there by ``pip install .``); the repository's Cargo build
(``native/target/release``, then ``debug``). ``esem run`` refuses a binary that the
dynamic loader does not run (a static executable: nothing can be interposed) and one it
would start in secure-execution mode (setuid or setgid to other credentials, or with
file capabilities: the loader then ignores ``LD_PRELOAD``), so it never pretends to
protect what it cannot reach.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
from pathlib import Path

LIBRARY_NAME = "libesem_preload.so"
_PACKAGE = Path(__file__).resolve().parent
_REPO_NATIVE = _PACKAGE.parents[1] / "native"
HEADER = _REPO_NATIVE / "include" / "esem.h"
PT_INTERP = 3  # ELF program header type naming the dynamic loader


class NativeError(Exception):
    """The native library is missing, or the program cannot run under it."""


def library_path() -> Path:
    """The preload library to use; ``NativeError`` saying how to build it if none."""
    env = os.environ.get("ESEM_PRELOAD_LIB")
    if env:
        path = Path(env)
        if not path.is_file():
            raise NativeError(f"ESEM_PRELOAD_LIB={env} is not a file")
        return path.resolve()
    # pip names it like an extension module: libesem_preload.cpython-311-x86_64-...so
    installed = sorted((_PACKAGE / "_native").glob("libesem_preload*.so"))
    candidates = [*installed, _PACKAGE / "_native" / LIBRARY_NAME]
    candidates += [_REPO_NATIVE / "target" / kind / LIBRARY_NAME for kind in ("release", "debug")]
    for path in candidates:
        if path.is_file():
            return path
    raise NativeError(
        f"{LIBRARY_NAME} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "build it with `cargo build --release --manifest-path native/Cargo.toml` or set "
        "ESEM_PRELOAD_LIB"
    )


def resolve_program(program: str) -> Path:
    """The executable ``program`` names (a path, or found on ``$PATH``)."""
    found = shutil.which(program) if "/" not in program else program
    if found is None or not os.path.isfile(found):
        raise NativeError(f"{program}: command not found")
    return Path(found)


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF executable without a program interpreter: the kernel
    starts it directly, no dynamic loader runs, and ``LD_PRELOAD`` is ignored.
    Scripts and dynamically linked programs are False."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            return False  # a script (#!) or something the kernel hands to an interpreter
        cls, data = head[4], head[5]
        end = "<" if data == 1 else ">"
        if cls == 2:
            phoff, = struct.unpack_from(end + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        else:
            phoff, = struct.unpack_from(end + "I", head, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            entry = f.read(4)
            if len(entry) < 4:
                break
            if struct.unpack(end + "I", entry)[0] == PT_INTERP:
                return False
    return True


def secure_exec_reason(path: Path) -> str | None:
    """Why the dynamic loader would run ``path`` in secure-execution mode (``AT_SECURE``),
    in which it ignores ``LD_PRELOAD`` (ld.so(8)): the exec changes the effective uid or
    gid (a setuid or setgid file not owned by the caller's real uid or gid), or grants
    file capabilities. None if it would not."""
    st = os.stat(path)
    if st.st_mode & stat.S_ISUID and st.st_uid != os.getuid():
        return f"setuid to uid {st.st_uid}"
    if st.st_mode & stat.S_ISGID and st.st_gid != os.getgid():
        return f"setgid to gid {st.st_gid}"
    try:
        os.getxattr(path, "security.capability")
    except OSError:
        return None
    return "given file capabilities (security.capability)"


def preload_environment(all_semaphores: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with the library preloaded (ahead of any
    other preload) and, for ``all_semaphores``, ``ESEM_PRELOAD_ALL=1``."""
    env = dict(os.environ if base is None else base)
    lib = str(library_path())
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != lib]
    env["LD_PRELOAD"] = " ".join([lib, *others])
    if all_semaphores:
        env["ESEM_PRELOAD_ALL"] = "1"
    else:
        env.pop("ESEM_PRELOAD_ALL", None)
    return env


def exec_under_preload(argv: list[str], all_semaphores: bool) -> None:
    """Replace this process with ``argv`` under the preload library (never returns
    unless it raises ``NativeError``/``OSError``)."""
    if not argv:
        raise NativeError("no command given (esem run [--all] -- CMD ARGS)")
    program = resolve_program(argv[0])
    if is_static_elf(program):
        raise NativeError(
            f"{program} is a statically linked executable: the dynamic loader never runs, "
            "so LD_PRELOAD cannot move its semaphores into esem; rebuild it dynamically "
            "linked"
        )
    secure = secure_exec_reason(program)
    if secure is not None:
        raise NativeError(
            f"{program} is {secure}: the dynamic loader runs such a program in "
            "secure-execution mode and ignores LD_PRELOAD, so its semaphores would silently "
            "stay glibc's; run it without the setuid/setgid bit or capabilities, or as the "
            "user it would become"
        )
    env = preload_environment(all_semaphores)
    os.execve(program, argv, env)
