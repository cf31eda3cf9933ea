"""The native victim of the adversaries: a C program under the preload library.

The A2 and A4 adversaries attack the Python client in their own process; this module
lets them attack the native client as a C server meets it: ``native_victim.c``, built
here with the system's C compiler against ``esem.h``, runs as its own process with
``LD_PRELOAD`` set to the preload library and uses one e-semaphore through the plain
POSIX API (``sem_open(name, USE_ESEM)``, or ``esem_sem_open_keyed`` for a key-bound
one). Each operation runs in a thread of the victim and reports ``sem_*``'s return value
and errno; ``NativeSem`` turns those into the exceptions the Python client raises for the
same failure (``EPROTO``: the channel failed authentication, ``IntegrityError``; ``EIO``:
the service went away or stopped answering, ``ServiceUnavailable``; ...), so one judge
serves both clients. A victim process that dies is reported as ``VictimDied``, which no
adversary's expectations accept: a crash of the host program is not a clean error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from esem.errors import (
    BusyError,
    EsemError,
    ExistentialError,
    IntegrityError,
    KeyRejected,
    PermissionsError,
    ServiceUnavailable,
    SignalError,
)

SOURCE = Path(__file__).resolve().with_name("native_victim.c")
REPLY_TIMEOUT = 30.0  # seconds a synchronous command (open, create, view) may take


class VictimDied(Exception):
    """The native victim process ended while an operation was outstanding."""


@dataclass(frozen=True)
class NativeBuild:
    """The built victim and the preload library it runs under."""

    exe: Path
    library: Path


def build(workdir: Path, library: Path | None = None) -> NativeBuild | str:
    """Compile the victim into ``workdir``, to run under ``library`` (default: the one
    ``esem run`` uses); the build, or why the native client cannot be attacked here (no
    compiler, no preload library, no esem.h)."""
    from esem.native import HEADER, NativeError, library_path

    if library is None:
        try:
            library = library_path()
        except NativeError as exc:
            return f"the preload library is not built: {exc}"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return "no C compiler to build the native victim"
    if not HEADER.is_file():
        return f"{HEADER} not found (the native victim includes esem.h)"
    out = workdir / "native-victim"
    out.mkdir(mode=0o755, exist_ok=True)
    exe = out / "esem-native-victim"
    # A copy of the library beside it, readable by the other uids the attacks run as.
    lib = out / library.name
    shutil.copyfile(library, lib)
    os.chmod(lib, 0o755)
    r = subprocess.run([cc, "-Wall", "-O1", "-pthread", "-I", str(HEADER.parent), str(SOURCE),
                        "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        return f"the native victim did not compile: {r.stderr.strip()[:300]}"
    os.chmod(exe, 0o755)
    return NativeBuild(exe, lib)


_EXCEPTIONS: dict[int, type[EsemError]] = {
    errno.EPROTO: IntegrityError,
    errno.EIO: ServiceUnavailable,
    errno.ETIMEDOUT: BusyError,
    errno.EAGAIN: BusyError,
    errno.EKEYREJECTED: KeyRejected,
    errno.EACCES: PermissionsError,
    errno.ENOENT: ExistentialError,
    errno.EEXIST: ExistentialError,
    errno.EBADF: ExistentialError,
    errno.EINVAL: ExistentialError,
    errno.EINTR: SignalError,
}


def error_for(err: int, what: str) -> EsemError:
    """The exception the Python client raises for what ``errno`` says (its errno's name
    kept in ``c_errno``, for the evidence)."""
    cls = _EXCEPTIONS.get(err, EsemError)
    name = errno.errorcode.get(err, str(err))
    exc = cls(f"native {what}: -1, errno {name} ({os.strerror(err)})")
    exc.c_errno = name  # type: ignore[attr-defined]
    return exc


class NativeVictim:
    """One victim process (one session with the service, through ``socket_path``; on
    the switchless rings with ``switchless``)."""

    def __init__(self, build: NativeBuild, socket_path: Path, pubkey: bytes, *,
                 user: tuple[int, int] | None = None, switchless: bool = False) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESEM_")}
        env.update(LD_PRELOAD=str(build.library), ESEM_SOCKET=str(socket_path),
                   ESEM_PUBKEY=pubkey.hex())
        if switchless:
            env["ESEM_SWITCHLESS"] = "1"
        kwargs: dict[str, object] = {}
        if user is not None:
            kwargs = {"user": user[0], "group": user[1], "extra_groups": []}
        self.proc = subprocess.Popen(
            [str(build.exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env,
            **kwargs,  # type: ignore[call-overload]
        )
        self._cond = threading.Condition()
        self._done: dict[int, list[int]] = {}
        self._lines: list[list[str]] = []
        self._next = 0
        self._alive = True
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name="native-victim-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = line.split()
            with self._cond:
                if words and words[0] == "done" and len(words) == 5:
                    self._done[int(words[1])] = [int(w) for w in words[2:]]
                elif words:
                    self._lines.append(words)
                self._cond.notify_all()
        with self._cond:
            self._alive = False
            self._cond.notify_all()

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise VictimDied(f"the native victim is gone ({exc})") from exc

    def command(self, line: str) -> list[str]:
        """Send a synchronous command; its answer's words (after the command word)."""
        self._send(line)
        with self._cond:
            if not self._cond.wait_for(lambda: self._lines or not self._alive, REPLY_TIMEOUT):
                raise VictimDied(f"the native victim did not answer {line.split()[0]!r}")
            if not self._lines:
                raise VictimDied(f"the native victim exited ({self.proc.poll()})")
            words = self._lines.pop(0)
        return words[1:]

    @property
    def pid(self) -> int:
        pid: int = self.proc.pid
        return pid

    def transport(self) -> int:
        """The preload library's ``esem_transport()`` in the victim (2: the rings)."""
        return int(self.command("transport")[0])

    def start(self, kind: str, ms: int | None = None) -> int:
        """Start one sem_* call in a thread of the victim; its id for ``result``."""
        with self._cond:
            self._next += 1
            op_id = self._next
        self._send(f"op {op_id} {kind}" + (f" {ms}" if ms is not None else ""))
        return op_id

    def result(self, op_id: int, timeout: float | None = None) -> tuple[int, int, int]:
        """(return value, errno, value) of a started call; ``TimeoutError`` if it has not
        returned within ``timeout``, ``VictimDied`` if the victim ended first."""
        with self._cond:
            self._cond.wait_for(lambda: op_id in self._done or not self._alive, timeout)
            if op_id in self._done:
                rc, err, value = self._done.pop(op_id)
                return rc, err, value
            if self._alive:
                raise TimeoutError(f"operation {op_id} still running after {timeout} s")
        raise VictimDied(f"the native victim died during operation {op_id} "
                         f"(exit status {self.proc.poll()})")

    def op(self, kind: str, ms: int | None = None) -> int:
        """Run one sem_* call in a thread of the victim and wait for it; its value (for
        getvalue) or the exception its errno stands for."""
        rc, err, value = self.result(self.start(kind, ms))
        if rc != 0:
            raise error_for(err, f"sem_{kind}")
        return value

    def close(self) -> None:
        """End the victim (its session ends with it)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(2.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _key_arg(key: bytes | None) -> str:
    return f" {key.hex()}" if key else ""


def _check(words: list[str], what: str) -> list[str]:
    if not words or words[0] != "0":
        err = int(words[1]) if len(words) > 1 else errno.EIO
        raise error_for(err, what)
    return words


class NativeSem:
    """The victim's semaphore, with the methods the adversaries call on EsemSemaphore."""

    def __init__(self, victim: NativeVictim) -> None:
        self.victim = victim
        self.token = b""

    @classmethod
    def open(cls, victim: NativeVictim, name: str, key: bytes | None) -> NativeSem:
        _check(victim.command(f"open {name}{_key_arg(key)}"), "sem_open")
        return cls(victim)

    @classmethod
    def create(cls, victim: NativeVictim, name: str, value: int,
               key: bytes | None) -> NativeSem:
        words = _check(victim.command(f"create {name} {value}{_key_arg(key)}"), "sem_open")
        sem = cls(victim)
        sem.token = bytes.fromhex(words[2])
        return sem

    def wait(self) -> None:
        self.victim.op("wait")

    def trywait(self) -> None:
        self.victim.op("trywait")

    def timedwait(self, timeout: float) -> None:
        self.victim.op("timedwait", round(timeout * 1000))

    def post(self) -> None:
        self.victim.op("post")

    def getvalue(self) -> int:
        return self.victim.op("getvalue")

    def view(self, name: str, key: bytes | None) -> tuple[int, bool, bool, str]:
        """The owner's check: (value, the name still opens, the handle waits and posts,
        error)."""
        words = self.victim.command(f"view {name}{_key_arg(key)}")
        value, named, works, err = (int(w) for w in words)
        error = "" if value >= 0 else str(error_for(err, "sem_getvalue"))
        return value, bool(named), bool(works), error

    def unlink(self, name: str, key: bytes | None) -> None:
        _check(self.victim.command(f"unlink {name}{_key_arg(key)}"), "sem_unlink")
