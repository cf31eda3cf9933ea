"""A C program as the ring adversary's victim: the native client, not the Python one.

``esem-ring-victim NAME`` opens the existing semaphore NAME with
``sem_open(name, USE_ESEM)`` under the preload library (``ESEM_SWITCHLESS=1``, so its
session runs on the switchless rings), says which transport it got, and then does what
it is told, one JSON string per line on stdin (``"wait"``, ``"post"``, ``"getvalue"``,
``"exit"``), answering one JSON object per line on stdout: ``{"result": "success"}`` or
``{"result": "CLASS: strerror (errno N)"}``, CLASS being what the Python client would
raise for that failure (``EPROTO``, the preload library's errno for a channel that
failed authentication or broke the protocol: ``IntegrityError``; ``EIO``, a service gone:
``ServiceUnavailable``). The same line protocol as ``esem.attack.a3_rogue.Channel``, so
the A2 ring scenarios drive it exactly as they drive a forked Python victim.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from esem.attack.a3_rogue import Channel, Child
from esem.bench.native_micro import build_c_program
from esem.native import preload_environment

SOURCE = r"""
/* esem-ring-victim NAME: a switchless native client doing what stdin says (written by
 * esem attack; see esem/attack/native_ring_victim.py). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <string.h>
#include "esem.h"

static const char *klass(int e) {
    if (e == EPROTO) return "IntegrityError";
    if (e == EIO) return "ServiceUnavailable";
    return "OSError";
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: esem-ring-victim NAME\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    sem_t *s = sem_open(argv[1], USE_ESEM);
    if (s == SEM_FAILED) {
        printf("{\"crash\": \"sem_open: %s\"}\n", strerror(errno));
        return 1;
    }
    int (*transport)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "esem_transport");
    printf("{\"transport\": %d}\n", transport ? transport() : -1);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        int rc, value;
        if (strcmp(line, "\"exit\"\n") == 0) return 0;
        else if (strcmp(line, "\"wait\"\n") == 0) rc = sem_wait(s);
        else if (strcmp(line, "\"post\"\n") == 0) rc = sem_post(s);
        else if (strcmp(line, "\"getvalue\"\n") == 0) rc = sem_getvalue(s, &value);
        else {
            printf("{\"crash\": \"unknown command\"}\n");
            return 1;
        }
        if (rc == 0) printf("{\"result\": \"success\"}\n");
        else printf("{\"result\": \"%s: %s (errno %d)\"}\n", klass(errno), strerror(errno), errno);
    }
    return 0;
}
"""

SWITCHLESS = 2  # esem_transport(): the session runs on the rings


def binary() -> Path:
    """The victim, compiled on first use (``NativeError`` if it cannot be)."""
    return build_c_program(SOURCE, "esem-ring-victim")


def ring_fd(pid: int) -> int:
    """The descriptor number of a process's switchless region (its memfd), found as any
    same-uid process finds it: through ``/proc/PID/fd``."""
    base = f"/proc/{pid}/fd"
    for entry in os.listdir(base):
        with contextlib.suppress(OSError):
            if os.readlink(f"{base}/{entry}").startswith("/memfd:esem-ring"):
                return int(entry)
    raise RuntimeError(f"process {pid} has no switchless region open")


def spawn(socket_path: Path, pubkey: bytes, name: str, timeout: float) -> Child:
    """Start the victim under the preload library against the service at
    ``socket_path`` (its key pinned), switchless; its channel answers within
    ``timeout``. ``NativeError`` if the program or the library is missing."""
    exe = str(binary())
    env = preload_environment(False)
    env.update({"ESEM_SOCKET": str(socket_path), "ESEM_PUBKEY": pubkey.hex(),
                "ESEM_SWITCHLESS": "1"})
    env.pop("ESEM_DIR", None)
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - becomes the victim program
        try:
            os.dup2(down_r, 0)
            os.dup2(up_w, 1)
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            os.execve(exe, [exe, name], env)
        finally:
            os._exit(127)
    os.close(down_r)
    os.close(up_w)
    return Child(pid, Channel(up_r, down_w, timeout=timeout))
