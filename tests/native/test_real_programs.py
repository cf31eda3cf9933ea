"""Real, unmodified programs under ``esem run --all`` against a live service: Apache httpd
(prefork MPM, its accept mutex a POSIX semaphore shared by root's parent and the
``www-data`` children) serving requests, and PostgreSQL (its backends sleep on unnamed
process-shared semaphores in shared memory) running pgbench. ``stress-ng --sem`` is in
test_preload.py.

Each test starts its own service with metrics on (the service's admin view of what it
holds per uid and which requests it served) and shows from there that the program's
semaphores really lived in the service: Apache's mutex is unlinked right after it is
created, and PostgreSQL's are unnamed, so ``esem ls`` cannot list them; the per-uid
session and semaphore gauges and the WAIT/POST counters can. The programs run as root
(Apache must, to bind and to drop to www-data) or as ``postgres`` (which refuses root),
so the service's directory is 0755 as in tests/conftest.py. CI installs the Debian
packages (.ci/run); a machine without them, or not running as root, skips.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import http.client
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.server.embedded import EmbeddedService

APACHE = "/usr/sbin/apache2"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
REQUESTS = 200
START_SERVERS = 4  # children forked at start (MinSpare = MaxSpare: no more, no fewer)
APACHE_DEFAULT_WORKERS = 150  # prefork's default MaxRequestWorkers
PAGE = b"esem served by apache prefork\n" * 64  # 1920 bytes: more than one small read

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="runs Apache and PostgreSQL as their own users (root)")


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no user {name} (its Debian package is not installed)")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def _shared_tmpdir(prefix: str) -> Iterator[Path]:
    """A temp dir other uids can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Watched:
    """A private service with Prometheus metrics: what it holds and served, per uid."""

    def __init__(self, svc: EmbeddedService) -> None:
        self.svc = svc
        deadline = time.monotonic() + 15
        while True:
            m = re.search(r"metrics on http://([\d.]+):(\d+)/metrics",
                          svc.log_path.read_text(errors="replace"))
            if m:
                self.url = f"http://{m[1]}:{m[2]}/metrics"
                break
            assert time.monotonic() < deadline, "the service never logged its metrics port"
            time.sleep(0.05)

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
    def requests(sample: dict[str, float], opcode: str) -> float:
        """Requests of ``opcode`` served: granted, queued or refused alike."""
        return sum(v for k, v in sample.items()
                   if k.startswith("esem_requests_total{") and f'opcode="{opcode}"' in k)


@pytest.fixture
def watched() -> Iterator[Watched]:
    with _watching() as w:
        yield w


@contextlib.contextmanager
def _watching(*extra: str) -> Iterator[Watched]:
    svc = EmbeddedService(extra_args=["--metrics", "127.0.0.1:0", *extra])
    svc.dir.mkdir(parents=True, exist_ok=True)
    # Apache's www-data children and PostgreSQL's postgres processes must reach the
    # socket and the published public key; the private key stays 0600 inside.
    os.chmod(svc.dir, 0o755)
    svc.start()
    try:
        yield Watched(svc)
    finally:
        svc.cleanup()


def _env(svc: EmbeddedService, preload: Path) -> dict[str, str]:
    """This environment aimed at ``svc`` only (no other service's socket or key)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESEM_", "LD_PRELOAD"))}
    return {**env, **svc.env(), "ESEM_PRELOAD_LIB": str(preload)}


def _spawn(argv: list[str], svc: EmbeddedService, preload: Path,
           root: Path) -> subprocess.Popen[bytes]:
    """``esem run --all -- ARGV`` in ``root``, output to ``root/out.log``, in a session of
    its own: prefork's shutdown signals its whole process group, and a parent that dies
    early must not leave its children in ours."""
    with (root / "out.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "esem", "run", "--all", "--", *argv],
            env=_env(svc, preload), cwd=root, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], sig: int, out: Path) -> str:
    """Stop a server started in its own session with ``sig`` (its orderly shutdown), then
    kill whatever is left of its process group (children of a parent that died), and
    return its output."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return out.read_text(errors="replace")


# ------------------------------------------------------------------------ Apache

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
CustomLog "{root}/logs/access.log" small
"""


def _get(port: int, path: str) -> tuple[int, bytes, int | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        length = resp.getheader("Content-Length")
        return resp.status, body, None if length is None else int(length)
    finally:
        conn.close()


def _wait_listening(ports: list[int], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    for port in ports:
        while True:
            assert proc.poll() is None, f"apache2 exited {proc.returncode}:\n" + (
                log.read_text(errors="replace") if log.exists() else "(no error log)")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, f"apache2 never listened on {port}"
            time.sleep(0.1)


@pytest.mark.parametrize("start", [START_SERVERS, APACHE_DEFAULT_WORKERS],
                         ids=["small", "default-workers"])
def test_apache_prefork_accept_mutex(preload: Path, watched: Watched, start: int) -> None:
    """``default-workers``: all of prefork's default 150 workers at once, each with its
    own session (all root's): the default session quota must let them in."""
    if not os.path.exists(APACHE) or not (APACHE_MODULES / "mod_mpm_prefork.so").exists():
        pytest.skip("Debian apache2 is not installed (.ci/run installs it)")
    _user("www-data")
    with _shared_tmpdir("esem-apache-") as root:
        for sub in ("htdocs", "run", "logs"):
            (root / sub).mkdir()
        (root / "htdocs" / "page.txt").write_bytes(PAGE)
        (root / "htdocs").chmod(0o755)
        (root / "htdocs" / "page.txt").chmod(0o644)
        ports = _free_ports(2)
        conf = root / "httpd.conf"
        conf.write_text(APACHE_CONF.format(root=root, mods=APACHE_MODULES,
                                           port1=ports[0], port2=ports[1],
                                           start=start, workers=start))
        before = watched.scrape()
        proc = _spawn([APACHE, "-d", str(root), "-f", str(conf), "-D", "FOREGROUND"],
                      watched.svc, preload, root)
        try:
            _wait_listening(ports, proc, root / "logs" / "error.log")
            deadline = time.monotonic() + 120
            while watched.scrape().get('esem_uid_sessions{uid="0"}', 0) < 1 + start:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    watched.scrape().get('esem_uid_sessions{uid="0"}')
                time.sleep(0.2)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda i: _get(ports[i % 2], "/page.txt"),
                                        range(REQUESTS)))
            during = watched.scrape()
        finally:
            out = _stop(proc, signal.SIGTERM, root / "out.log")
        error_log = (root / "logs" / "error.log").read_text(errors="replace")
        access = (root / "logs" / "access.log").read_text(errors="replace").splitlines()

    assert all(r == (200, PAGE, len(PAGE)) for r in results), [
        (s, len(b), n) for s, b, n in results if (s, b, n) != (200, PAGE, len(PAGE))][:5]
    assert len(access) == REQUESTS and all(" 200 1920" in line for line in access), access[:5]
    assert "mpm_prefork" in error_log and "AH00163" in error_log, error_log  # resuming normal
    assert "emerg" not in error_log and "alert" not in error_log, error_log
    assert proc.returncode == 0, out
    # The service saw Apache: root's parent created the accept mutex and unlinked it at
    # once (so no name is left), and it stayed alive, open; each child attached it in its
    # own session (opened in the fork handler, before the child's setuid to www-data: so
    # a root session, which is why Apache's workers count against root's session quota);
    # the children waited and posted on it, about once each per request.
    assert during.get('esem_uid_semaphores{uid="0"}', 0) >= 1, during
    assert during.get("esem_names", -1) == 0, during
    assert during.get('esem_uid_sessions{uid="0"}', 0) >= 1 + start, during
    assert during.get("esem_sessions_refused_total", -1) == 0, during
    attaches = Watched.requests(during, "ATTACH") - Watched.requests(before, "ATTACH")
    assert attaches >= start, attaches
    waits = Watched.requests(during, "WAIT") - Watched.requests(before, "WAIT")
    posts = Watched.requests(during, "POST") - Watched.requests(before, "POST")
    assert waits >= REQUESTS and posts >= REQUESTS, (waits, posts)


# -------------------------------------------------------------------- PostgreSQL

PG_CLIENTS, PG_TRANSACTIONS = 4, 150  # pgbench -c 4 -t 150: 600 TPC-B transactions
PG_MAX_CONNECTIONS = 20


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]))
    if not found or not os.path.exists(Path(found[-1]).parent / "pgbench"):
        pytest.skip("Debian postgresql is not installed (.ci/run installs it)")
    return Path(found[-1]).parent


def test_postgresql_pgbench(preload: Path, watched: Watched) -> None:
    bin_dir = _pg_bin()
    pg = _user("postgres")
    with _shared_tmpdir("esem-pg-") as root:
        data, sock = root / "data", root / "sock"
        for d in (data, sock):
            d.mkdir(mode=0o700)
            os.chown(d, pg.pw_uid, pg.pw_gid)
        as_pg = {"user": pg.pw_uid, "group": pg.pw_gid, "extra_groups": [], "cwd": root}
        made = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                               "-A", "trust", "--no-sync", "-E", "UTF8", "--locale", "C"],
                              capture_output=True, text=True, timeout=120, **as_pg)  # type: ignore[arg-type]
        assert made.returncode == 0, made.stdout + made.stderr
        port = _free_ports(1)[0]
        conn = ["-h", str(sock), "-p", str(port), "-U", "postgres"]
        before = watched.scrape()
        # postgres refuses to run as root; esem run starts as root and setpriv (which
        # execs, keeping the environment) drops to postgres, as a systemd User= would.
        # (esem run itself as postgres would need an interpreter that user can read.)
        postmaster = _spawn(
            ["setpriv", "--reuid", str(pg.pw_uid), "--regid", str(pg.pw_gid),
             "--clear-groups", "--",
             str(bin_dir / "postgres"), "-D", str(data), "-k", str(sock),
             "-p", str(port), "-c", "listen_addresses=", "-c", "fsync=off",
             "-c", f"max_connections={PG_MAX_CONNECTIONS}"], watched.svc, preload, root)
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([str(bin_dir / "pg_isready"), *conn, "-q"]).returncode != 0:
                assert postmaster.poll() is None, (root / "out.log").read_text()
                assert time.monotonic() < deadline, "postgres never accepted connections"
                time.sleep(0.2)
            init = subprocess.run([str(bin_dir / "pgbench"), *conn, "-i", "-s", "1", "-q",
                                   "postgres"], capture_output=True, text=True, timeout=300)
            assert init.returncode == 0, init.stderr
            bench = subprocess.run(
                [str(bin_dir / "pgbench"), *conn, "-c", str(PG_CLIENTS), "-j", "2",
                 "-t", str(PG_TRANSACTIONS), "postgres"],
                capture_output=True, text=True, timeout=600)
            during = watched.scrape()
            sums = subprocess.run(
                [str(bin_dir / "psql"), *conn, "-At", "-d", "postgres", "-c",
                 "select (select sum(abalance) from pgbench_accounts), "
                 "(select sum(delta) from pgbench_history), "
                 "(select count(*) from pgbench_history)"],
                capture_output=True, text=True, timeout=60)
        finally:
            log = _stop(postmaster, signal.SIGINT, root / "out.log")  # SIGINT: fast shutdown
        after = watched.scrape()

    assert bench.returncode == 0, bench.stdout + bench.stderr
    total = PG_CLIENTS * PG_TRANSACTIONS
    assert f"number of transactions actually processed: {total}/{total}" in bench.stdout, \
        bench.stdout
    assert "number of failed transactions: 0" in bench.stdout, bench.stdout
    # TPC-B's invariant: every transaction adds its delta to one account and logs it.
    assert sums.returncode == 0, sums.stderr
    abalance, delta, history = sums.stdout.strip().split("|")
    assert int(abalance) == int(delta) and int(history) == total, sums.stdout
    assert postmaster.returncode == 0 and "database system is shut down" in log, log
    # The service held PostgreSQL's semaphores: the postmaster's sem_init of one per
    # possible process (max_connections, autovacuum and background workers, auxiliary
    # processes), all owned by postgres, destroyed again at shutdown; its children's
    # sessions (one per process, of uid postgres) waited and posted on them.
    uid = pg.pw_uid
    assert during.get(f'esem_uid_semaphores{{uid="{uid}"}}', 0) >= PG_MAX_CONNECTIONS, during
    assert during.get(f'esem_uid_sessions{{uid="{uid}"}}', 0) >= 3, during
    assert after.get(f'esem_uid_semaphores{{uid="{uid}"}}', 0) == 0, after
    assert after.get(f'esem_uid_sessions{{uid="{uid}"}}', 0) == 0, after
    waits = Watched.requests(during, "WAIT") - Watched.requests(before, "WAIT")
    posts = Watched.requests(during, "POST") - Watched.requests(before, "POST")
    assert waits > 0 and posts > 0, (waits, posts)


def test_apache_refused_session_is_reported_as_such(preload: Path) -> None:
    """A worker whose fork-time session the service refuses (root's session quota, 4
    here) connects later, after its setuid, as www-data, and that session may not
    attach root's mutex. The worker must see the refusal's cause (EDQUOT, "Disk quota
    exceeded" in Apache's log), not EINVAL as if the mutex were not a semaphore."""
    if not os.path.exists(APACHE) or not (APACHE_MODULES / "mod_mpm_prefork.so").exists():
        pytest.skip("Debian apache2 is not installed (.ci/run installs it)")
    _user("www-data")
    with _watching("--quota-sessions", "4") as w, _shared_tmpdir("esem-apache-") as root:
        for sub in ("htdocs", "run", "logs"):
            (root / sub).mkdir()
        ports = _free_ports(2)
        conf = root / "httpd.conf"
        conf.write_text(APACHE_CONF.format(root=root, mods=APACHE_MODULES, port1=ports[0],
                                           port2=ports[1], start=8, workers=8))
        proc = _spawn([APACHE, "-d", str(root), "-f", str(conf), "-D", "FOREGROUND"],
                      w.svc, preload, root)
        try:
            proc.wait(timeout=60)  # a worker that cannot take the mutex is fatal to httpd
        finally:
            out = _stop(proc, signal.SIGTERM, root / "out.log")
        error_log = (root / "logs" / "error.log").read_text(errors="replace")
    assert proc.returncode != 0, out
    grab = [line for line in error_log.splitlines() if "AH00144" in line]
    assert grab, error_log
    assert all("Disk quota exceeded" in line for line in grab), grab


def test_stress_ng_sem_in_the_service(preload: Path, watched: Watched) -> None:
    """``stress-ng --sem`` (unnamed, process-private semaphores; test_preload.py shows it
    fails without a service): the service served its posts and waits."""
    stress = shutil.which("stress-ng")
    if stress is None:
        pytest.skip("stress-ng is not installed (.ci/run installs it)")
    before = watched.scrape()
    with _shared_tmpdir("esem-stress-") as root:
        proc = _spawn([stress, "--sem", "2", "-t", "2", "--metrics-brief"], watched.svc,
                      preload, root)
        try:
            proc.wait(timeout=120)
        finally:
            out = _stop(proc, signal.SIGTERM, root / "out.log")
    after = watched.scrape()
    assert proc.returncode == 0 and "successful run completed" in out, out
    posts = Watched.requests(after, "POST") - Watched.requests(before, "POST")
    waits = Watched.requests(after, "WAIT") - Watched.requests(before, "WAIT")
    assert posts > 100 and waits > 100, (posts, waits)
