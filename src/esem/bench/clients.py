"""The Python API on its two clients, measured in one run: ``python -m esem.bench.clients``.

For each placement (``same``: client and service pinned to one vCPU; ``split``: to two),
one embedded service, and one child process per client (``ESEM_CLIENT=python`` and
``native``): the median and p99 latency of ``post`` and of ``wait`` through
``sem_open(..., flags=USE_ESEM)``, with the client's and the service's CPU per call
(user+system, all threads: the native client's reader thread counts). Then a loop of
``--posts`` ``post`` calls from Python on the native client beside the same loop on a
legacy ``posix_ipc`` semaphore (the kernel-free glibc fast path). Ratios are only ever
taken within one placement of one run; the figures are noisy on a shared machine, so
report them with the load average printed at the top.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

CLIENTS = ("python", "native")
PLACEMENTS = ("same", "split")


def _pin_all_threads(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (affinity is per thread on Linux)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), {cpu})


def _child(client: str, n: int, posts: int, service_pid: int, cpu: int) -> dict[str, Any]:
    """Runs in the measuring process (ESEM_CLIENT already set by the parent)."""
    from esem.api import O_CREAT, USE_ESEM, sem_open, sem_unlink
    from esem.bench.common import process_cpu
    from esem.client.blocking import get_client

    os.sched_setaffinity(0, {cpu})
    out: dict[str, Any] = {}
    if client == "legacy":
        import posix_ipc

        name = f"/esem-bench-clients-{os.getpid()}"
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
        try:
            t0 = time.perf_counter()
            for _ in range(posts):
                sem.release()
            out["post_loop_s"] = time.perf_counter() - t0
        finally:
            sem.unlink()
            sem.close()
        return out
    name = f"/esem-bench-clients-{client}-{os.getpid()}"
    sem = sem_open(name, O_CREAT, 0o600, 0, flags=USE_ESEM)
    try:
        sem.post()
        sem.wait()  # the session is up, its reader thread (native) too
        _pin_all_threads(os.getpid(), cpu)
        out["transport"] = get_client().transport
        post_ns: list[int] = []
        wait_ns: list[int] = []
        clock = time.perf_counter_ns
        cpu0, svc0 = time.process_time(), process_cpu(service_pid)
        for _ in range(n):
            t0 = clock()
            sem.post()
            t1 = clock()
            sem.wait()
            t2 = clock()
            post_ns.append(t1 - t0)
            wait_ns.append(t2 - t1)
        cpu1, svc1 = time.process_time(), process_cpu(service_pid)
        for case, samples in (("post", post_ns), ("wait", wait_ns)):
            samples.sort()
            out[f"{case}_median_us"] = statistics.median(samples) / 1000
            out[f"{case}_p99_us"] = samples[min(len(samples) - 1, len(samples) * 99 // 100)] / 1000
        calls = 2 * n
        out["client_cpu_us_per_call"] = (cpu1 - cpu0) / calls * 1e6
        if svc0 is not None and svc1 is not None:
            out["service_cpu_us_per_call"] = (svc1 - svc0) / calls * 1e6
        if posts and client == "native":
            t0 = time.perf_counter()
            for _ in range(posts):
                sem.post()
            out["post_loop_s"] = time.perf_counter() - t0
    finally:
        sem.close()
        sem_unlink(name, flags=USE_ESEM)
    return out


def _run_child(client: str, n: int, posts: int, env: dict[str, str], service_pid: int,
               cpu: int) -> dict[str, Any]:
    child_env = {**os.environ, **env, "ESEM_CLIENT": "python" if client == "legacy" else client}
    child_env.pop("ESEM_SWITCHLESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "esem.bench.clients", "--child", client, str(n), str(posts),
         str(service_pid), str(cpu)],
        env=child_env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{client} child failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure(n: int, posts: int, placements: tuple[str, ...]) -> list[dict[str, Any]]:
    from esem.server.embedded import EmbeddedService

    rows: list[dict[str, Any]] = []
    cpus = sorted(os.sched_getaffinity(0))
    for placement in placements:
        if placement == "split" and len(cpus) < 2:
            continue
        svc_cpu = cpus[0]
        client_cpu = cpus[0] if placement == "same" else cpus[1]
        with EmbeddedService() as svc:
            assert svc.proc is not None
            _pin_all_threads(svc.proc.pid, svc_cpu)
            for client in (*CLIENTS, "legacy"):
                loop = posts if client != "python" else 0
                got = _run_child(client, n, loop, svc.env(), svc.proc.pid, client_cpu)
                for metric, value in got.items():
                    if metric == "transport":
                        continue
                    rows.append({"bench": "clients", "backend": client,
                                 "placement": placement, "metric": metric, "value": value,
                                 "transport": got.get("transport", "-"),
                                 "iterations": posts if metric == "post_loop_s" else n})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'placement':<9} {'client':<7} {'metric':<26} {'value':>12}"]
    for r in rows:
        unit = "s" if r["metric"].endswith("_s") else ""
        lines.append(f"{r['placement']:<9} {r['backend']:<7} {r['metric']:<26} "
                     f"{r['value']:>12.2f}{unit}")
    for placement in PLACEMENTS:
        by = {(r["backend"], r["metric"]): r["value"] for r in rows
              if r["placement"] == placement}
        for case in ("post_median_us", "wait_median_us"):
            py, nat = by.get(("python", case)), by.get(("native", case))
            if py and nat:
                lines.append(f"{placement:<9} native/python {case}: {nat / py:.2f}x")
        nat, leg = by.get(("native", "post_loop_s")), by.get(("legacy", "post_loop_s"))
        count = next((r["iterations"] for r in rows if r["metric"] == "post_loop_s"), 0)
        if nat and leg:
            lines.append(f"{placement:<9} {count} posts: native {nat:.1f}s, "
                         f"legacy posix_ipc {leg:.3f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        client, n, posts, service_pid, cpu = args[1], *map(int, args[2:6])
        print(json.dumps(_child(client, n, posts, service_pid, cpu)))
        return 0
    p = argparse.ArgumentParser(
        prog="python -m esem.bench.clients", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--iterations", type=int, default=5000,
                   help="post+wait pairs per client and placement (default 5000)")
    p.add_argument("--posts", type=int, default=1_000_000,
                   help="length of the post loop, native and legacy (default 1000000; 0: none)")
    p.add_argument("--placement", choices=(*PLACEMENTS, "both"), default="both",
                   help="same vCPU, split vCPUs, or both (default)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the rows as JSON to FILE ('-': stdout, table to stderr)")
    ns = p.parse_args(args)
    if ns.iterations < 1 or ns.posts < 0:
        p.error("--iterations must be at least 1 and --posts at least 0")
    placements = PLACEMENTS if ns.placement == "both" else (ns.placement,)
    load = os.getloadavg()
    rows = measure(ns.iterations, ns.posts, placements)
    doc = {"machine": {"loadavg": load, "cpus": len(os.sched_getaffinity(0)),
                       "python": sys.version.split()[0]}, "results": rows}
    table = f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n" + _table(rows)
    if ns.json == "-":
        print(json.dumps(doc, indent=2))
        print(table, file=sys.stderr)
    else:
        print(table)
        if ns.json:
            with open(ns.json, "w") as f:
                json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
