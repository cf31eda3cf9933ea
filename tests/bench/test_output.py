"""What ``esem bench`` prints while it runs and before it runs: progress bars with an ETA
on a terminal (a real pseudo-terminal), one plain line per step in a pipe, nothing with
``--quiet``, no ANSI codes anywhere off a terminal; and a missing ``bench`` extra named
with its ``pip install`` line, exit 2, before anything is measured (the extra is made
unimportable in a child process, not uninstalled).
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ANSI = re.compile(r"\x1b\[")


def esem(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esem", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_plain_progress_in_a_pipe_one_line_per_step_with_eta() -> None:
    done = esem("bench", "latsem", "--smoke", "--pairs", "1", "--restart", "0,0.5",
                "--rounds", "5", "--placement", "same")
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stderr.splitlines() if "latsem:" in line]
    assert len(steps) == 4, done.stderr  # legacy and esem, two restart ratios each
    assert "(step 1/4)" in steps[0]
    assert "(step 4/4, about " in steps[-1] and steps[-1].endswith(" left)")
    assert not ANSI.search(done.stderr) and not ANSI.search(done.stdout)
    # the table is plain text too: a '-' rule under the header, no box drawing
    assert "latsem: one-way hand-off latency" in done.stdout
    assert not re.search(r"[\u2500-\u257f]", done.stdout)


def test_quiet_prints_no_progress() -> None:
    done = esem("bench", "latsem", "--smoke", "--pairs", "1", "--restart", "0",
                "--rounds", "5", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "latsem: one-way hand-off latency" in done.stdout


def test_bars_with_eta_on_a_terminal(tmp_path: Path) -> None:
    """stderr on a real pty: rich draws the bar (steps done of all, elapsed, ETA) and
    the step lines; stdout, a pipe, stays plain."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "esem", "bench", "stress", "--smoke",
                             "--seconds", "1"], stdout=subprocess.PIPE, stderr=slave,
                            text=True, env={**os.environ, "COLUMNS": "120",
                                            "TERM": "xterm"})
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the pty
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    raw = seen.decode(errors="replace")
    assert "\x1b[" in raw  # a live, redrawn, coloured bar
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "stress: legacy" in text
    assert re.search(r"\d+/\d+ steps \d+:\d\d:\d\d ETA \d+:\d\d:\d\d", text), text[-2000:]
    assert "━" in text
    assert "stress-ng's semaphore stressor" in out and not ANSI.search(out)


@pytest.mark.parametrize(("command", "poisoned", "missing"), [
    (["all", "--smoke", "--out", "{tmp}/report"], ["matplotlib"], "matplotlib"),
    (["all", "--smoke", "--out", "{tmp}/report"], ["redis"], "redis"),
    (["peer", "--smoke"], ["redis"], "redis"),
])
def test_a_missing_extra_is_named_before_measuring(tmp_path: Path, command: list[str],
                                                   poisoned: list[str], missing: str) -> None:
    # sys.modules[name] = None makes `import name` raise ImportError, as if the package
    # were not installed; only in this child process.
    code = ("import sys\n"
            f"for name in {poisoned!r}: sys.modules[name] = None\n"
            "from esem.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["bench", *(a.replace("{tmp}", str(tmp_path)) for a in command)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "install it with: pip install 'esem[bench]'" in done.stderr
    assert f"needs the Python package(s) {missing}" in done.stderr
    assert "ModuleNotFoundError" not in done.stderr and "Traceback" not in done.stderr
    assert "step" not in done.stderr  # nothing was measured
    assert not (tmp_path / "report").exists()


def test_commands_without_the_extra_still_run() -> None:
    code = ("import sys\n"
            "for name in ('matplotlib', 'redis'): sys.modules[name] = None\n"
            "from esem.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "bench", "micro", "-n", "10",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "micro: latency per operation" in done.stdout
