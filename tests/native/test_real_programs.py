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
import http.client
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.bench.app_servers import (
    APACHE,
    APACHE_MODULES,
    PgCluster,
    ServerError,
    Watched,
    apache_site,
    pg_bin,
    shared_tmpdir,
    spawn,
    stop,
    wait_listening,
    watched_service,
)
from esem.server.embedded import EmbeddedService

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


@pytest.fixture
def watched() -> Iterator[Watched]:
    with watched_service() as w:
        yield w


def _spawn(argv: list[str], svc: EmbeddedService, preload: Path,
           root: Path) -> subprocess.Popen[bytes]:
    """``esem run --all -- ARGV`` in ``root`` (app_servers.spawn: its own session)."""
    return spawn(argv, root, svc, preload)


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
    try:
        wait_listening(ports, proc, log)
    except ServerError as exc:
        pytest.fail(str(exc))


# ------------------------------------------------------------------------ Apache

@pytest.mark.parametrize("start", [START_SERVERS, APACHE_DEFAULT_WORKERS],
                         ids=["small", "default-workers"])
def test_apache_prefork_accept_mutex(preload: Path, watched: Watched, start: int) -> None:
    """``default-workers``: all of prefork's default 150 workers at once, each with its
    own session (all root's): the default session quota must let them in."""
    if not os.path.exists(APACHE) or not (APACHE_MODULES / "mod_mpm_prefork.so").exists():
        pytest.skip("Debian apache2 is not installed (.ci/run installs it)")
    _user("www-data")
    with shared_tmpdir("esem-apache-") as root:
        conf, ports = apache_site(root, PAGE, start)
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
            out = stop(proc, signal.SIGTERM, root / "out.log")
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
    found = pg_bin()
    if found is None:
        pytest.skip("Debian postgresql is not installed (.ci/run installs it)")
    return found


def test_postgresql_pgbench(preload: Path, watched: Watched) -> None:
    _pg_bin()
    pg = _user("postgres")
    with shared_tmpdir("esem-pg-") as root:
        cluster = PgCluster(root, max_connections=PG_MAX_CONNECTIONS)
        cluster.initdb()
        before = watched.scrape()
        # postgres refuses to run as root; esem run starts as root and setpriv (which
        # execs, keeping the environment) drops to postgres, as a systemd User= would.
        # (esem run itself as postgres would need an interpreter that user can read.)
        cluster.start(watched.svc, preload)
        postmaster = cluster.proc
        assert postmaster is not None
        try:
            init = cluster.pgbench("-i", "-s", "1", "-q", timeout=300)
            assert init.returncode == 0, init.stderr
            bench = cluster.pgbench("-c", str(PG_CLIENTS), "-j", "2",
                                    "-t", str(PG_TRANSACTIONS))
            during = watched.scrape()
            sums = cluster.tpcb_sums()
        finally:
            log = cluster.stop()  # SIGINT: fast shutdown
        after = watched.scrape()

    assert bench.returncode == 0, bench.stdout + bench.stderr
    total = PG_CLIENTS * PG_TRANSACTIONS
    assert f"number of transactions actually processed: {total}/{total}" in bench.stdout, \
        bench.stdout
    assert "number of failed transactions: 0" in bench.stdout, bench.stdout
    # TPC-B's invariant: every transaction adds its delta to one account and logs it.
    abalance, delta, history = sums
    assert abalance == delta and history == total, sums
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
    with watched_service("--quota-sessions", "4") as w, shared_tmpdir("esem-apache-") as root:
        conf, _ = apache_site(root, PAGE, 8)
        proc = _spawn([APACHE, "-d", str(root), "-f", str(conf), "-D", "FOREGROUND"],
                      w.svc, preload, root)
        try:
            proc.wait(timeout=60)  # a worker that cannot take the mutex is fatal to httpd
        finally:
            out = stop(proc, signal.SIGTERM, root / "out.log")
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
    with shared_tmpdir("esem-stress-") as root:
        proc = _spawn([stress, "--sem", "2", "-t", "2", "--metrics-brief"], watched.svc,
                      preload, root)
        try:
            proc.wait(timeout=120)
        finally:
            out = stop(proc, signal.SIGTERM, root / "out.log")
    after = watched.scrape()
    assert proc.returncode == 0 and "successful run completed" in out, out
    posts = Watched.requests(after, "POST") - Watched.requests(before, "POST")
    waits = Watched.requests(after, "WAIT") - Watched.requests(before, "WAIT")
    assert posts > 100 and waits > 100, (posts, waits)
