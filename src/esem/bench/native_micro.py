"""The native rows of ``esem bench micro``: the POSIX ``sem_*`` API from C, through the
preload library (``esem native``) and through glibc (``legacy native``), and the native
floor of any socket design.

``esem native`` is a small C program (kept below, compiled by the bench with the system's
C compiler on first use and cached by the hash of its source and compiler) that opens a
named semaphore with ``sem_open(name, O_CREAT | USE_ESEM, ...)`` (``native/include/esem.h``)
and times N of each operation and a cross-process hand-off (a fork, two semaphores,
ping-pong) under ``LD_PRELOAD`` of ``libesem_preload.so``. The same binary without the
preload library and without ``USE_ESEM`` gives the legacy figures of a C program, so the
native column is compared with C, not with ctypes. The floor is ``esem-floor`` (the Rust
crate ``native/esem-bench``, built with cargo): a Unix-socketpair round trip between two
processes with a ChaCha20-Poly1305 seal and open each way.

Every program prints JSON: raw latency samples (summarised here exactly as the Python
rows are) and its own CPU time per loop, with the service's CPU read by the C program
through the service's POSIX CPU clock at the same loop boundaries. Both programs run
where ``esem.bench.placement`` pinned this process (the child inherits it), and pin their
forked second process to the vCPU they are given: the placement's, for legacy's hand-off
and the floor's echo side where the service would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esem.bench.common import BenchError
from esem.native import HEADER, NativeError, library_path, preload_environment

CASE_PREFIX = "native/"  # micro rows of the C program: native/post, native/handoff, ...
FLOOR_CASE = "native-aead-roundtrip"
OPS = ("open", "close", "unlink", "post", "wait", "trywait", "getvalue")
CASES = (*OPS, "handoff")
CPU_CASES = {"open+close": 2, "post": 1, "wait": 1, "trywait": 1, "getvalue": 1,
             "handoff": 4}
_NATIVE_DIR = HEADER.parent.parent  # the repository's native/ workspace
FLOOR_BINARY = _NATIVE_DIR / "target" / "release" / "esem-floor"

C_SOURCE = r"""
/* esem-micro BACKEND N SERVICE_PID TAG CHILD_CPU: N of each semaphore operation and N
 * hand-off rounds (the forked pong process pinned to CHILD_CPU unless it is -1),
 * on a named semaphore (BACKEND esem: oflag | USE_ESEM, run under the preload library;
 * legacy: glibc's). JSON on stdout: latency samples in microseconds, per loop
 * [calls, this process's CPU s, the service's CPU s or null], and the transport the
 * preload library's session used (esem_transport(): 2 rings, 1 socket, 0 none; -1
 * without the library). `esem-micro probe` prints only the transport.
 * Written by esem bench. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "esem.h"

static int flag;
static pid_t service;
static int child_cpu = -1;

static void die(const char *what) {
    fprintf(stderr, "esem-micro: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double clock_s(clockid_t c) {
    struct timespec ts;
    if (clock_gettime(c, &ts) != 0) return -1.0;
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double self_cpu(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

static double service_cpu(void) {
    clockid_t c;
    if (service <= 0 || clock_getcpuclockid(service, &c) != 0) return -1.0;
    return clock_s(c);
}

static long long mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int first = 1;
static void put_samples(const char *name, const double *s, int n) {
    printf("%s\"%s\": [", first ? "" : ", ", name);
    first = 0;
    for (int i = 0; i < n; i++) printf(i ? ", %.3f" : "%.3f", s[i]);
    printf("]");
}

struct cpu { const char *name; long calls; double client, service; };
static struct cpu cpus[8];
static int ncpu;
static double c0, s0;
static void meter(void) { c0 = self_cpu(); s0 = service_cpu(); }
static void metered(const char *name, long calls, double extra) {
    double s1 = service_cpu();
    struct cpu c = {name, calls, self_cpu() - c0 + extra, s0 < 0 || s1 < 0 ? -1.0 : s1 - s0};
    cpus[ncpu++] = c;
}

typedef int (*op_fn)(sem_t *);
static int getvalue(sem_t *s) { int v; return sem_getvalue(s, &v); }

static void time_each(sem_t *s, op_fn op, const char *name, double *buf, int n) {
    meter();
    for (int i = 0; i < n; i++) {
        long long t0 = mono_ns();
        if (op(s) != 0) die(name);
        buf[i] = (mono_ns() - t0) / 1000.0;
    }
    metered(name, n, 0.0);
    put_samples(name, buf, n);
}

static void ops(const char *tag, int n, double *a, double *b) {
    char name[96], victim[128];
    snprintf(name, sizeof name, "/esem-nbench-%s", tag);
    sem_t *base = sem_open(name, O_CREAT | flag, 0600, 0);
    if (base == SEM_FAILED) die("sem_open O_CREAT");
    /* A name this process has open is not looked up again (glibc and the preload library
     * both return the same sem_t *): close it, so each open below is a real one. */
    sem_close(base);
    sem_t *w = sem_open(name, flag, 0, 0); /* warm-up, untimed */
    if (w == SEM_FAILED || sem_close(w) != 0) die("sem_open warm-up");
    meter();
    for (int i = 0; i < n; i++) {
        long long t0 = mono_ns();
        /* mode and value too, though unused without O_CREAT: the preload library
         * (0.1.0) checks the value even then, and would read leftover registers. */
        sem_t *h = sem_open(name, flag, 0, 0);
        long long t1 = mono_ns();
        if (h == SEM_FAILED) die("sem_open");
        if (sem_close(h) != 0) die("sem_close");
        a[i] = (t1 - t0) / 1000.0;
        b[i] = (mono_ns() - t1) / 1000.0;
    }
    metered("open+close", 2L * n, 0.0);
    put_samples("open", a, n);
    put_samples("close", b, n);
    base = sem_open(name, flag, 0, 0);
    if (base == SEM_FAILED) die("sem_open");
    time_each(base, sem_post, "post", a, n);
    time_each(base, sem_wait, "wait", a, n);
    for (int i = 0; i < n; i++)
        if (sem_post(base) != 0) die("sem_post");
    time_each(base, sem_trywait, "trywait", a, n);
    time_each(base, getvalue, "getvalue", a, n);
    for (int i = 0; i < n; i++) { /* one at a time: never near the per-uid quota */
        snprintf(victim, sizeof victim, "%s-%d", name, i);
        sem_t *v = sem_open(victim, O_CREAT | flag, 0600, 0);
        if (v == SEM_FAILED) die("sem_open victim");
        sem_close(v);
        long long t0 = mono_ns();
        if (sem_unlink(victim) != 0) die("sem_unlink");
        a[i] = (mono_ns() - t0) / 1000.0;
    }
    put_samples("unlink", a, n);
    sem_close(base);
    if (sem_unlink(name) != 0) die("sem_unlink");
}

static void handoff(const char *tag, int n, double *a) {
    char pn[96], qn[96];
    snprintf(pn, sizeof pn, "/esem-nping-%s", tag);
    snprintf(qn, sizeof qn, "/esem-npong-%s", tag);
    sem_t *ping = sem_open(pn, O_CREAT | flag, 0600, 0);
    sem_t *pong = sem_open(qn, O_CREAT | flag, 0600, 0);
    if (ping == SEM_FAILED || pong == SEM_FAILED) die("sem_open ping/pong");
    int fds[2];
    if (pipe(fds) != 0) die("pipe");
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) { /* the pong side, through the inherited handles */
        close(fds[0]);
        if (child_cpu >= 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(child_cpu, &set);
            if (sched_setaffinity(0, sizeof set, &set) != 0) _exit(1);
        }
        if (sem_wait(ping) != 0 || sem_post(pong) != 0) _exit(1); /* warm-up round */
        double t0 = self_cpu();
        for (int i = 0; i < n; i++)
            if (sem_wait(ping) != 0 || sem_post(pong) != 0) _exit(1);
        double cpu = self_cpu() - t0;
        if (write(fds[1], &cpu, sizeof cpu) != sizeof cpu) _exit(1);
        _exit(0);
    }
    close(fds[1]);
    if (sem_post(ping) != 0 || sem_wait(pong) != 0) die("hand-off warm-up");
    meter();
    for (int i = 0; i < n; i++) {
        long long t0 = mono_ns();
        if (sem_post(ping) != 0 || sem_wait(pong) != 0) die("hand-off");
        a[i] = (mono_ns() - t0) / 2000.0; /* one way: half the ping-pong */
    }
    double child_cpu = 0.0;
    if (read(fds[0], &child_cpu, sizeof child_cpu) != sizeof child_cpu) die("child cpu");
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
        die("the pong process failed");
    metered("handoff", 4L * n, child_cpu);
    put_samples("handoff", a, n);
    sem_close(ping);
    sem_close(pong);
    sem_unlink(pn);
    sem_unlink(qn);
}

static int transport(void) {
    int (*f)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "esem_transport");
    return f ? f() : -1;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "probe") == 0) {
        printf("{\"transport\": %d}\n", transport());
        return 0;
    }
    if (argc != 6) {
        fprintf(stderr, "usage: esem-micro esem|legacy N SERVICE_PID TAG CHILD_CPU\n");
        return 2;
    }
    child_cpu = atoi(argv[5]);
    flag = strcmp(argv[1], "esem") == 0 ? USE_ESEM : 0;
    int n = atoi(argv[2]);
    service = (pid_t)atoi(argv[3]);
    if (n < 1) return 2;
    double *a = malloc(sizeof(double) * n), *b = malloc(sizeof(double) * n);
    if (!a || !b) die("malloc");
    printf("{\"samples\": {");
    ops(argv[4], n, a, b);
    handoff(argv[4], n, a);
    printf("}, \"cpu\": {");
    for (int i = 0; i < ncpu; i++) {
        printf("%s\"%s\": [%ld, %.9f, ", i ? ", " : "", cpus[i].name, cpus[i].calls,
               cpus[i].client);
        if (cpus[i].service < 0) printf("null]");
        else printf("%.9f]", cpus[i].service);
    }
    printf("}, \"transport\": %d}\n", flag ? transport() : -1);
    return 0;
}
"""


@dataclass
class NativeMeasured:
    """What one run of the C program measured (the shape of ``micro.Measured``)."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, tuple[int, float, float | None]] = field(default_factory=dict)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "esem" / "bench"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeError("no C compiler (cc or gcc) on PATH to build the native benchmark")
    return cc


def c_binary() -> Path:
    """The compiled C benchmark, built on first use; cached by source, header and
    compiler, so an edit or another compiler rebuilds it."""
    return build_c_program(C_SOURCE, "esem-micro")


def build_c_program(source: str, stem: str) -> Path:
    """A C program of the package (``source``, which may include ``esem.h``), compiled on
    first use into the cache and found there again by the hash of its source, the header
    and the compiler, so an edit or another compiler rebuilds it."""
    if not HEADER.is_file():
        raise NativeError(f"{HEADER} not found (the native programs need the repository's "
                          "native/ directory)")
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             check=False).stdout
    digest = hashlib.sha256(
        "\0".join((source, HEADER.read_text(), cc, version)).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{stem}-{digest}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Per-process names: two benches building at once never read each other's files.
    src = out.with_name(out.name + f".{os.getpid()}.c")
    src.write_text(source)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    done = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-I", str(HEADER.parent), "-o",
                           str(tmp), str(src), "-pthread"], capture_output=True, text=True,
                          check=False)
    src.unlink()
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise NativeError(f"building {stem} failed:\n{done.stderr.strip()}")
    tmp.replace(out)  # atomic: a concurrent build sees the whole binary or none
    return out


def floor_binary() -> Path:
    """``esem-floor``, built with cargo (which itself skips the build when up to date)."""
    cargo = shutil.which("cargo")
    manifest = _NATIVE_DIR / "Cargo.toml"
    if cargo is None or not manifest.is_file():
        if FLOOR_BINARY.is_file():
            return FLOOR_BINARY
        raise NativeError("the native floor needs cargo and the repository's native/ "
                          "workspace (cargo build --release -p esem-bench)")
    done = subprocess.run([cargo, "build", "--release", "--quiet", "--manifest-path",
                           str(manifest), "-p", "esem-bench", "--bin", "esem-floor"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not FLOOR_BINARY.is_file():
        raise NativeError(f"building esem-floor failed:\n{done.stderr.strip()}")
    return FLOOR_BINARY


def check_available() -> None:
    """Raise ``NativeError`` saying what is missing, before anything is measured."""
    library_path()
    c_binary()
    floor_binary()


def _run_json(argv: list[str], env: dict[str, str] | None, timeout: float) -> Any:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s") \
            from exc
    if done.returncode != 0:
        raise BenchError(f"{Path(argv[0]).name} failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")
    try:
        return json.loads(done.stdout)
    except ValueError as exc:
        raise BenchError(f"{Path(argv[0]).name} printed no JSON: {exc}") from exc


def _one_cpu(cpus: frozenset[int] | None) -> int:
    """The vCPU a native program pins its second process to (-1: leave it)."""
    if cpus is None:
        return -1
    if len(cpus) != 1:
        raise ValueError(f"a native program pins to one vCPU, not {sorted(cpus)}")
    return next(iter(cpus))


TRANSPORTS = {2: "switchless", 1: "socket"}  # esem_transport() of the preload library


def check_transport(got: int, mode: str, what: str) -> None:
    """Refuse to label native figures with a transport the native client did not use
    (``ESEM_SWITCHLESS=1`` falls back to the socket with only a warning; a preload
    library built before the native rings knows no switchless at all)."""
    used = TRANSPORTS.get(got)
    if used != mode:
        raise BenchError(f"{what}: the native client's session ran over "
                         f"{used or 'no esem session'}, not {mode} (rebuild the preload "
                         "library: pip install -e ., or cargo build --release)")


def probe_transport(env: dict[str, str]) -> int:
    """The transport a native client gets in ``env`` (the C program's ``probe``)."""
    data = _run_json([str(c_binary()), "probe"], env, timeout=60)
    return int(data["transport"])


def measure(backend: str, n: int, service_pid: int | None, tag: str,
            child_cpus: frozenset[int] | None = None, mode: str = "socket") -> NativeMeasured:
    """N of each operation and N hand-off rounds from C: ``esem`` under the preload library
    (against the service this process's environment names, over the transport ``mode``
    names: a run that got another raises ``BenchError``), ``legacy`` through glibc; the
    pong process of the hand-off pinned to ``child_cpus`` (None: not pinned)."""
    env = preload_environment(False) if backend == "esem" else \
        {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    data = _run_json([str(c_binary()), backend, str(n), str(service_pid or 0), tag,
                      str(_one_cpu(child_cpus))], env, timeout=60 + n * 0.1)
    if backend == "esem":
        check_transport(int(data["transport"]), mode, "micro")
    m = NativeMeasured()
    for case in CASES:
        m.samples[case] = [float(x) for x in data["samples"][case]]
    for case, (calls, client, service) in data["cpu"].items():
        m.cpu[case] = (int(calls), float(client),
                       None if service is None or backend != "esem" else float(service))
    return m


def measure_floor(rounds: int,
                  echo_cpus: frozenset[int] | None = None) -> tuple[list[float], float]:
    """The native AEAD round trip: samples in us, and both processes' CPU (s); the echo
    process pinned to ``echo_cpus`` (None: not pinned)."""
    argv = [str(floor_binary()), str(rounds)]
    if echo_cpus is not None:
        argv.append(str(_one_cpu(echo_cpus)))
    data = _run_json(argv, None, timeout=60 + rounds * 0.01)
    cpu = data["cpu_s"]
    return [float(x) for x in data["samples_us"]], float(cpu["parent"]) + float(cpu["child"])
