"""``esem bench app``: the FILE VAULT's requests per second, legacy beside esem, no attack.

What it measures is the price of esem in a real application: the same vault, the same
concurrent clients writing and reading back the same files, once with its two
semaphores as legacy POSIX semaphores and once in the esem service (key-bound), and
esem's overhead in percent of legacy's requests per second (11% in the run the README
reports, on a shared 2-core machine; it varies with the machine and its load). Runs
alternate backends, three times each, and the median of each is reported, so slow drift
of a busy machine hits both alike. Every file is verified byte
for byte after each run; a run that lost or corrupted one raises instead of reporting.
"""

from __future__ import annotations

import argparse
from typing import Any

from esem.bench.common import (
    NO_MODE,
    BenchError,
    Options,
    Phase,
    Row,
    Table,
    esem_target,
    lookup,
    median,
    num,
    phase,
    row,
)

BENCH = "app"
CASE = "vault"
REPEATS = 3
CLIENTS, FILES, SIZE = 8, 12, 4096  # per run: CLIENTS x FILES puts, then as many gets
SMOKE = (6, 2, 1024, 1)  # clients, files, size, repeats


def _one(backend: str, socket_path: str | None, clients: int, files: int, size: int) -> float:
    from esem.vault.workload import run_workload

    r = run_workload(backend, "none", clients=clients, files=files, size=size,
                     esem_socket=socket_path)
    if r.files_intact != r.files_written or r.files_lost_or_corrupt or r.slot_failures:
        raise BenchError(f"vault run on {backend} was not clean: {r.evidence}")
    return float(r.requests_per_s)


def run(opts: Options, args: argparse.Namespace | None = None) -> list[Row]:
    clients, files, size, repeats = (SMOKE if opts.smoke
                                     else (CLIENTS, FILES, SIZE, REPEATS))
    rows: list[Row] = []
    with phase("app", 2 * repeats * len(opts.modes)) as ph:
        for mode in opts.modes:
            rows += _mode(opts, mode, ph, clients, files, size, repeats)
    return rows


def _mode(opts: Options, mode: str, ph: Phase, clients: int, files: int, size: int,
          repeats: int) -> list[Row]:
    rows: list[Row] = []
    with esem_target(mode, opts.socket) as target:
        legacy: list[float] = []
        esem: list[float] = []
        for i in range(repeats):
            what = f"{clients} clients x {files} files"
            ph.step(f"app: vault run {i + 1}/{repeats}, {what}, legacy")
            legacy.append(_one("legacy", None, clients, files, size))
            ph.step(f"app: vault run {i + 1}/{repeats}, {what}, esem ({mode})")
            esem.append(_one("esem", target.socket_path, clients, files, size))
        leg, es = median(legacy), median(esem)
        if mode == opts.modes[0]:
            rows.append(row(BENCH, "legacy", NO_MODE, CASE, "requests_per_s", leg, "req/s"))
        rows.append(row(BENCH, "esem", mode, CASE, "requests_per_s", es, "req/s"))
        # Overhead in percent of legacy's rate; negative (esem faster: noise) shows as 0.
        rows.append(row(BENCH, "esem", mode, CASE, "overhead",
                        max(0.0, (leg - es) / leg * 100), "%"))
    return rows


def tables(results: list[Row]) -> list[Table]:
    rows = [r for r in results if r["bench"] == BENCH]
    leg = lookup(rows, backend="legacy", metric="requests_per_s")
    body = [["legacy", "-", num(leg), "-"]]
    for r in rows:
        if r["backend"] == "esem" and r["metric"] == "requests_per_s":
            body.append(["esem", r["mode"], num(r["value"]),
                         num(lookup(rows, backend="esem", mode=r["mode"],
                                    metric="overhead")) + "%"])
    return [Table("app: FILE VAULT requests per second (put + get, TLS, no attack)",
                  ["backend", "mode", "requests/s", "overhead"], body,
                  ["median of alternating runs; every file verified byte for byte"])]


def add_arguments(parser: Any) -> None:
    """No options beyond the common ones (--smoke, --mode, --socket, --json)."""
