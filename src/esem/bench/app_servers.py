"""Real servers from Debian's packages, started and stopped in a private directory on
loopback, legacy or under ``esem run --all``: Apache httpd (prefork, its accept mutex a
POSIX semaphore), PostgreSQL (unnamed process-shared semaphores in its shared memory) and
``stress-ng``; and a private esem service with Prometheus metrics, whose counters show
that a program's semaphores really lived in the service and how many operations it made.

Shared by ``esem bench app`` and tests/native/test_real_programs.py, so both start the
programs the same way. Nothing here is mocked: the servers are the installed binaries,
the service is a real daemon. A server runs in a session (process group) of its own:
prefork's shutdown signals its whole group, and a parent that dies early must not leave
its children behind; ``stop`` kills whatever is left of the group.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from esem.server.embedded import EmbeddedService

APACHE = "/usr/sbin/apache2"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
# The semaphore operations of a program, as the service counts requests by opcode.
SEM_OPCODES = ("WAIT", "POST", "GETVALUE", "CANCEL")


class ServerError(Exception):
    """A real server could not be set up, started or checked."""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def shared_tmpdir(prefix: str) -> Iterator[Path]:
    """A temp dir other uids (www-data, postgres) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


# ------------------------------------------------------------------ the service


class Watched:
    """A private service with Prometheus metrics: what it holds and served, per uid."""

    def __init__(self, svc: EmbeddedService, timeout: float = 15.0) -> None:
        self.svc = svc
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(r"metrics on http://([\d.]+):(\d+)/metrics",
                          svc.log_path.read_text(errors="replace"))
            if m:
                self.url = f"http://{m[1]}:{m[2]}/metrics"
                break
            if time.monotonic() > deadline:
                raise ServerError("the service never logged its metrics port")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.svc.proc is not None
        return self.svc.proc.pid

    def scrape(self) -> dict[str, float]:
        """Every sample as ``name{labels}`` -> value."""
        with urllib.request.urlopen(self.url, timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    @staticmethod
    def requests(sample: Mapping[str, float], opcode: str) -> float:
        """Requests of ``opcode`` served: granted, queued or refused alike."""
        return sum(v for k, v in sample.items()
                   if k.startswith("esem_requests_total{") and f'opcode="{opcode}"' in k)

    @classmethod
    def sem_ops(cls, before: Mapping[str, float], after: Mapping[str, float]) -> float:
        """Semaphore operations (wait, post, getvalue, cancel) served between two scrapes."""
        return sum(cls.requests(after, op) - cls.requests(before, op) for op in SEM_OPCODES)


@contextlib.contextmanager
def watched_service(*extra: str, switchless: bool = False) -> Iterator[Watched]:
    svc = EmbeddedService(extra_args=["--metrics", "127.0.0.1:0", *extra],
                          switchless=switchless)
    svc.dir.mkdir(parents=True, exist_ok=True)
    # Apache's www-data children and PostgreSQL's postgres processes must reach the
    # socket and the published public key; the private key stays 0600 inside.
    os.chmod(svc.dir, 0o755)
    svc.start()
    try:
        yield Watched(svc)
    finally:
        svc.cleanup()


# ----------------------------------------------------------------- processes


def clean_env(svc: EmbeddedService | None = None, preload: Path | None = None,
              switchless: bool = False) -> dict[str, str]:
    """This environment without any esem or preload setting; aimed at ``svc`` (and its
    preload library, for ``esem run``) when given: a legacy run gets neither."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESEM_", "LD_PRELOAD"))}
    if svc is not None:
        env.update(svc.env())
        if preload is not None:
            env["ESEM_PRELOAD_LIB"] = str(preload)
        if switchless:
            env["ESEM_SWITCHLESS"] = "1"
    return env


def spawn(argv: list[str], root: Path, svc: EmbeddedService | None = None,
          preload: Path | None = None, switchless: bool = False,
          log: str = "out.log") -> subprocess.Popen[bytes]:
    """``esem run --all -- ARGV`` (with ``svc``) or ``ARGV`` itself (legacy), in ``root``,
    output to ``root/LOG``, in a session of its own."""
    cmd = ([sys.executable, "-m", "esem", "run", "--all", "--", *argv] if svc is not None
           else argv)
    with (root / log).open("wb") as out:
        return subprocess.Popen(cmd, env=clean_env(svc, preload, switchless), cwd=root,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], sig: int, out: Path, timeout: float = 60.0) -> str:
    """Stop a server started by ``spawn`` with ``sig`` (its orderly shutdown), then kill
    whatever is left of its process group, and return its output."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
        # Until the last of them is gone it still holds what the next start needs
        # (PostgreSQL refuses to start while its old shared memory is attached).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
    return out.read_text(errors="replace") if out.exists() else ""


# -------------------------------------------------------------------- Apache

APACHE_CONF = """\
ServerRoot "{root}"
ServerName 127.0.0.1
PidFile "{root}/run/httpd.pid"
DefaultRuntimeDir "{root}/run"
LoadModule mpm_prefork_module {mods}/mod_mpm_prefork.so
LoadModule authz_core_module {mods}/mod_authz_core.so
LoadModule mime_module {mods}/mod_mime.so
User www-data
Group www-data
Listen 127.0.0.1:{port1}
Listen 127.0.0.1:{port2}
# With two Listen ports prefork serializes accept; this makes the lock a POSIX semaphore.
Mutex posixsem default
StartServers {start}
MinSpareServers {start}
MaxSpareServers {start}
ServerLimit {workers}
MaxRequestWorkers {workers}
KeepAlive Off
TypesConfig /etc/mime.types
DocumentRoot "{root}/htdocs"
<Directory "{root}/htdocs">
    Require all granted
</Directory>
ErrorLog "{root}/logs/error.log"
LogLevel info
LogFormat "%h %>s %B" small
CustomLog "{root}/logs/access.log" {access}
"""


def apache_missing() -> str | None:
    """Why Apache prefork cannot run here, or None."""
    if not os.path.exists(APACHE) or not (APACHE_MODULES / "mod_mpm_prefork.so").exists():
        return "Debian apache2 is not installed"
    if user("www-data") is None:
        return "no user www-data"
    if os.geteuid() != 0:
        return "Apache must start as root (to bind and drop to www-data)"
    return None


def apache_site(root: Path, page: bytes, start: int, workers: int | None = None,
                access_log: bool = True) -> tuple[Path, list[int]]:
    """Write an Apache site under ``root`` serving ``/page.txt``; its config and ports."""
    for sub in ("htdocs", "run", "logs"):
        (root / sub).mkdir(exist_ok=True)
    (root / "htdocs" / "page.txt").write_bytes(page)
    (root / "htdocs").chmod(0o755)
    (root / "htdocs" / "page.txt").chmod(0o644)
    ports = free_ports(2)
    conf = root / "httpd.conf"
    # The benchmark logs no access lines: a log write per request is not what it measures.
    conf.write_text(APACHE_CONF.format(
        root=root, mods=APACHE_MODULES, port1=ports[0], port2=ports[1], start=start,
        workers=workers or start, access="small" if access_log else "small env=nolog"))
    return conf, ports


def apache_argv(root: Path, conf: Path) -> list[str]:
    return [APACHE, "-d", str(root), "-f", str(conf), "-D", "FOREGROUND"]


def wait_listening(ports: list[int], proc: subprocess.Popen[bytes], log: Path,
                   timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise ServerError(f"the server exited {proc.returncode}:\n" + (
                    log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"))
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise ServerError(f"the server never listened on {port}")
            time.sleep(0.1)


# ---------------------------------------------------------------- PostgreSQL


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (with pgbench), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]))
    if not found or not os.path.exists(Path(found[-1]).parent / "pgbench"):
        return None
    return Path(found[-1]).parent


def pg_missing() -> str | None:
    if pg_bin() is None:
        return "Debian postgresql is not installed"
    if user("postgres") is None:
        return "no user postgres"
    if os.geteuid() != 0:
        return "starting PostgreSQL as postgres needs root"
    return None


class PgCluster:
    """A PostgreSQL cluster in ``root`` (owned by postgres, on a private Unix socket
    directory and port, no TCP), started legacy or under ``esem run --all``."""

    def __init__(self, root: Path, max_connections: int = 20) -> None:
        bin_dir, pg = pg_bin(), user("postgres")
        if bin_dir is None or pg is None:
            raise ServerError(pg_missing() or "no PostgreSQL")
        self.bin, self.pg, self.root = bin_dir, pg, root
        self.data, self.sock = root / "data", root / "sock"
        self.port = free_ports(1)[0]
        self.max_connections = max_connections
        self.conn = ["-h", str(self.sock), "-p", str(self.port), "-U", "postgres"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "postgres.log"

    def initdb(self) -> None:
        for d in (self.data, self.sock):
            d.mkdir(mode=0o700)
            os.chown(d, self.pg.pw_uid, self.pg.pw_gid)
        made = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "--no-sync", "-E", "UTF8", "--locale", "C"], capture_output=True, text=True,
            timeout=120, user=self.pg.pw_uid, group=self.pg.pw_gid, extra_groups=[],
            cwd=self.root)
        if made.returncode != 0:
            raise ServerError(f"initdb failed: {made.stdout}{made.stderr}")

    def argv(self, *settings: str) -> list[str]:
        # postgres refuses to run as root; setpriv (which execs, keeping the environment
        # and so the preload) drops to postgres, as a systemd User= would.
        sets = [a for s in ("listen_addresses=", "fsync=off",
                            f"max_connections={self.max_connections}", *settings)
                for a in ("-c", s)]
        return ["setpriv", "--reuid", str(self.pg.pw_uid), "--regid", str(self.pg.pw_gid),
                "--clear-groups", "--", str(self.bin / "postgres"), "-D", str(self.data),
                "-k", str(self.sock), "-p", str(self.port), *sets]

    def start(self, svc: EmbeddedService | None = None, preload: Path | None = None,
              switchless: bool = False, timeout: float = 60.0) -> None:
        self.proc = spawn(self.argv(), self.root, svc, preload, switchless,
                          log=self.log.name)
        deadline = time.monotonic() + timeout
        while subprocess.run([str(self.bin / "pg_isready"), *self.conn, "-q"]).returncode:
            if self.proc.poll() is not None:
                raise ServerError("postgres exited: " + self.log.read_text()[-2000:])
            if time.monotonic() > deadline:
                raise ServerError("postgres never accepted connections")
            time.sleep(0.2)

    @property
    def postmaster_pid(self) -> int:
        """The postmaster's pid (postmaster.pid's first line; esem run and setpriv exec)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def children(self) -> list[int]:
        """The postmaster's child processes now (each backend makes a session of its
        own, so killing the postmaster's process group does not reach them)."""
        if self.proc is None:
            return []
        pids: list[int] = []
        for f in glob.glob(f"/proc/{self.proc.pid}/task/*/children"):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in Path(f).read_text().split()]
        return pids

    def stop(self, timeout: float = 60.0) -> str:
        """Fast shutdown (SIGINT); its log. A backend that ignores it (one asleep on a
        lost wake-up) is killed with the postmaster when ``timeout`` runs out."""
        if self.proc is None:
            return ""
        kids = self.children()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Kill the backends first, so that the postmaster reaps them (and then
            # exits, shutdown having been asked): none is left to init as a zombie.
            for pid in self.children():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        out = stop(self.proc, signal.SIGQUIT, self.log, 10)
        self.proc = None
        for pid in kids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in kids) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        return out

    def pgbench(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "pgbench"), *self.conn, *args, "postgres"],
                              capture_output=True, text=True, timeout=timeout)

    def popen_pgbench(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(self.bin / "pgbench"), *self.conn, *args, "postgres"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def psql(self, sql: str, timeout: float = 60.0) -> str:
        done = subprocess.run([str(self.bin / "psql"), *self.conn, "-At", "-d", "postgres",
                               "-c", sql], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ServerError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def tpcb_sums(self) -> tuple[int, int, int]:
        """TPC-B's invariant, read back: sum(abalance), sum(delta), count(history)."""
        out = self.psql("select (select coalesce(sum(abalance),0) from pgbench_accounts), "
                        "(select coalesce(sum(delta),0) from pgbench_history), "
                        "(select count(*) from pgbench_history)")
        a, d, n = out.split("|")
        return int(a), int(d), int(n)
