"""The Open POSIX Test Suite's semaphore conformance tests, fetched, built and run.

The suite is Debian's ``posixtestsuite`` source package (1.5.2). ``fetch`` gets it with
``apt-get source`` through an apt configuration of its own (a ``deb-src`` entry for this
system's Debian release, its own package lists, no lock): the system's apt sources are
never edited, ``apt-get update`` runs only when those private lists are missing, and the
unpacked tree is kept in a cache directory so that reruns download nothing. Binaries are
cached beside it, keyed by the compiler's version and the flags.

Run as a script it only fetches (and prints the tree): ``python tests/native/posixtestsuite.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

PACKAGE = "posixtestsuite"
# include/posixtest.h: the exit status of a test program is its verdict.
VERDICTS = {0: "PASS", 1: "FAIL", 2: "UNRESOLVED", 4: "UNSUPPORTED", 5: "UNTESTED"}
# The suite's Makefile and LDFLAGS file: CFLAGS, then the link flags after the source.
# Its -Werror is left out: with gcc 12 three tests (sem_timedwait/9-1, sem_unlink/4-1,
# sem_wait/7-1) warn about unused or maybe-uninitialized variables and would not build.
CFLAGS = ["-g", "-O2", "-Wall", "-D_POSIX_C_SOURCE=200112L", "-std=gnu99"]
LDFLAGS = ["-D_GNU_SOURCE", "-lpthread", "-lrt"]
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def default_cache() -> Path:
    if env := os.environ.get("ESEM_POSIXTS_CACHE"):
        return Path(env)
    system = Path("/var/cache/esem-tests") / PACKAGE
    if os.geteuid() == 0:
        return system
    return Path.home() / ".cache" / "esem-tests" / PACKAGE


def _os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value.strip().strip('"')
    return out


def _mirror() -> str:
    """The Debian archive the system's own apt sources use (deb822 or one-line format),
    so that a machine behind a local mirror fetches from it."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for uri in re.findall(r"^URIs:\s*(\S+)", path.read_text(), re.M):
            if "security" not in uri:
                return uri
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in lists:
        if path.exists():
            for m in re.finditer(r"^deb(?:-src)?\s+(?:\[[^]]*\]\s+)?(\S+)", path.read_text(),
                                 re.M):
                if "security" not in m.group(1):
                    return m.group(1)
    return DEFAULT_MIRROR


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _tree(cache: Path) -> Path | None:
    for top in sorted(cache.glob(f"{PACKAGE}-*")):
        if (top / "include" / "posixtest.h").is_file():
            return top
    return None


def fetch(cache: Path | None = None) -> Path:
    """The unpacked source tree, fetched with ``apt-get source`` on first use."""
    cache = cache or default_cache()
    with _locked(cache):
        if (top := _tree(cache)) is not None:
            return top
        codename = _os_release().get("VERSION_CODENAME") or "bookworm"
        apt = cache / "apt"
        (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        sources = apt / "deb-src.sources"
        sources.write_text(
            f"Types: deb-src\nURIs: {_mirror()}\nSuites: {codename}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
        opts = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
                f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt / 'cache'}",
                # Root would hand downloads to _apt, which cannot write into the cache.
                "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root", "-q"]
        def apt_get(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["apt-get", *opts, *args], cwd=cache, capture_output=True,
                                  text=True, timeout=600)

        def check(r: subprocess.CompletedProcess[str]) -> None:
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(map(str, r.args))} failed "
                                   f"({r.returncode}):\n{r.stdout[-1500:]}{r.stderr[-1500:]}")

        fresh = not any((apt / "lists").glob("*_Sources*"))
        if fresh:
            check(apt_get("update"))
        r = apt_get("source", PACKAGE)
        if r.returncode != 0 and not fresh:  # stale lists: the archive moved on
            check(apt_get("update"))
            r = apt_get("source", PACKAGE)
        check(r)
        top = _tree(cache)
        if top is None:
            raise RuntimeError(f"apt-get source {PACKAGE} left no source tree in {cache}")
        return top


def suite_sources(top: Path) -> dict[str, Path]:
    """``sem_post/8-1`` -> its source: the suite's runnable tests are NUMBER-NUMBER.c
    (locate-test --execs), not the *-buildonly ones nor the helpers they #include."""
    found: dict[str, Path] = {}
    for src in sorted((top / "conformance" / "interfaces").glob("sem_*/*.c")):
        if re.fullmatch(r"[0-9]+-[0-9]+\.c", src.name):
            found[f"{src.parent.name}/{src.stem}"] = src
    return found


def build(top: Path, out: Path | None = None, jobs: int = 2) -> dict[str, Path]:
    """Compile every test the way the suite's Makefile does; cached by compiler and flags."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler")
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(repr((version, CFLAGS, LDFLAGS)).encode()).hexdigest()[:16]
    out = out or top.parent / f"build-{key}"
    out.mkdir(parents=True, exist_ok=True)
    sources = suite_sources(top)

    def one(item: tuple[str, Path]) -> tuple[str, Path]:
        name, src = item
        exe = out / name.replace("/", "_")
        if not exe.exists():
            tmp = exe.with_suffix(".tmp")
            r = subprocess.run([gcc, *CFLAGS, f"-I{top / 'include'}", str(src), "-o",
                                str(tmp), *LDFLAGS], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{name} did not build:\n{r.stderr}")
            tmp.rename(exe)
        return name, exe

    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, sources.items()))


def run_one(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path,
            timeout: float) -> tuple[str, int, str]:
    """(verdict, pid, output) of one test program; HUNG past the timeout (the suite's
    Makefile word), INTERRUPTED for a signal or another status."""
    proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return "HUNG", proc.pid, output
    finally:
        # A test's forked children must not outlive it (they may hold a semaphore).
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return VERDICTS.get(proc.returncode, "INTERRUPTED"), proc.pid, output


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
