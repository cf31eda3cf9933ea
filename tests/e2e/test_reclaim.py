"""Recovery without a restart: a real process dies holding a unit of a plain semaphore,
and its owner gets the unit back with ``esem reclaim`` while the service runs on.

Real daemon, real processes (a forked child that exits holding the unit; a child that
drops to ``nobody`` for the refusal), the real command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import esem
import esem.client.blocking
from esem.cli import main as cli_main
from esem.client.blocking import Client
from esem.server.embedded import EmbeddedService

from . import reap, run_forked, spawn, stat, wait_for_waiters, wait_until

CREX = esem.O_CREAT | esem.O_EXCL


def esem_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esem", *args], capture_output=True,
                          text=True, timeout=60, input=stdin)


def _die_holding(sem: esem.EsemSemaphore) -> int:
    """Fork a child that takes a unit of ``sem`` and exits without posting it; returns
    its pid once the service has recorded it as a dead holder."""
    def child() -> int:
        sem.wait()
        return 0  # os._exit: the unit goes with the process

    pid = spawn(child)
    assert reap(pid) == 0
    key = sem._key  # a key-bound semaphore shows its holders only to a STAT with its key
    wait_until(lambda: [pid, 1] in stat(sem.name, key)["dead_holders"], what="dead holder")
    return pid


def test_owner_reclaims_a_dead_holders_unit(socket_service: EmbeddedService,
                                            sem_name: str) -> None:
    sem = esem.sem_open(sem_name, CREX, 0o600, 1, flags=esem.USE_ESEM)
    pid = _die_holding(sem)
    info = stat(sem_name)
    assert info["value"] == 0 and info["dead_holders"] == [[pid, 1]]
    # a waiter of this process queues behind the lost unit
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (sem.wait(), got.set()))
    waiter.start()
    wait_for_waiters(sem_name, 1)
    result = esem_cli("reclaim", sem_name, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"name": sem_name, "reclaimed": 1}
    waiter.join(30)
    assert got.is_set()  # the reclaimed unit went to the waiter, FIFO
    info = stat(sem_name)
    assert info["dead_holders"] == [] and info["reclaimed"] == 1
    assert info["holders"] == [[os.getpid(), 1]]
    assert info["value"] == (info["initial"] + info["posts"] - info["waits"]
                             + info["robust_releases"] + info["reclaimed"])
    # shown by esem stat, logged by the service with its level
    assert "reclaimed: 1" in esem_cli("stat", sem_name).stdout
    log = socket_service.log_path.read_text()
    assert "WARNING session" in log and f"reclaimed 1 unit(s) of {sem_name}" in log
    # nothing left: a second reclaim releases nothing
    again = esem_cli("reclaim", sem_name)
    assert again.returncode == 0 and "reclaimed 0 unit(s)" in again.stdout
    sem.post()


def test_a_running_process_keeps_its_units(socket_service: EmbeddedService,
                                           sem_name: str) -> None:
    """Attack on reclaim: a holder whose session ended while its process lives on (here:
    this very process, its second session closed) may still be inside its critical
    section. Reclaiming its unit would let a second process in: refused."""
    sem = esem.sem_open(sem_name, CREX, 0o600, 1, flags=esem.USE_ESEM)
    lost = Client(socket_service.socket_path)
    esem.sem_open(sem_name, flags=esem.USE_ESEM, client=lost).wait()
    lost.close()  # the session ends holding the unit; the process runs on
    wait_until(lambda: [os.getpid(), 1] in stat(sem_name)["dead_holders"], what="record")
    result = esem_cli("reclaim", sem_name)
    assert result.returncode == 0 and "reclaimed 0 unit(s)" in result.stdout
    info = stat(sem_name)
    assert info["dead_holders"] == [[os.getpid(), 1]] and info["value"] == 0
    with pytest.raises(esem.BusyError):
        sem.trywait()
    assert f"kept those of running pid(s) [{os.getpid()}]" in (
        socket_service.log_path.read_text())


def test_reclaim_key_bound_needs_the_key(socket_service: EmbeddedService, sem_name: str,
                                         tmp_path: Path) -> None:
    key = os.urandom(32)
    sem = esem.sem_open(sem_name, CREX, 0o600, 1, flags=esem.USE_ESEM, key=key)
    _die_holding(sem)
    refused = esem_cli("reclaim", sem_name)
    assert refused.returncode == 1 and "key" in refused.stderr
    assert stat(sem_name, key)["reclaimed"] == 0
    key_file = tmp_path / "key"
    key_file.write_text(key.hex() + "\n")
    done = esem_cli("reclaim", sem_name, "--key-file", str(key_file))
    assert done.returncode == 0, done.stderr
    assert "reclaimed 1 unit(s)" in done.stdout
    sem.trywait()  # the unit is back in the count
    sem.post()
    sem.unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")
def test_only_the_owner_or_root_may_reclaim(socket_service: EmbeddedService,
                                            sem_name: str) -> None:
    sem = esem.sem_open(sem_name, CREX, 0o666, 1, flags=esem.USE_ESEM)
    _die_holding(sem)
    nobody = pwd.getpwnam("nobody")

    def as_nobody() -> int:
        # Import what the command needs while still root: this interpreter's standard
        # library lives under /root, which nobody cannot read.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(
                io.StringIO()):
            assert cli_main(["reclaim", sem_name + "-absent"]) == 1
        esem.client.blocking._process_client = None  # not root's session
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_main(["reclaim", sem_name])
        # refused by the service (exit 1), saying why
        return 0 if code == 1 and "may not reclaim" in err.getvalue() else 9

    assert run_forked(as_nobody) == 0
    info = stat(sem_name)
    assert info["reclaimed"] == 0 and len(info["dead_holders"]) == 1
    assert "refused RECLAIM: EACCES" in socket_service.log_path.read_text()
