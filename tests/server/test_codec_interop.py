"""Both service codecs (ESEM_SERVICE_CODEC) with both clients (ESEM_CLIENT), end to end:
a real daemon per codec, real client processes running the same semaphore script,
key-bound semaphores (MACs both ways) and refusals included. Every combination must
give the same results, and each daemon must say which codec it ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

import esem.client.native as native_client
from esem.protocol.session import CODEC_ENV
from esem.server.embedded import EmbeddedService

pytest.importorskip("esem._native_core")

SCRIPT = r"""
import json, sys
import esem
from esem import O_CREAT, O_EXCL, USE_ESEM, sem_open

prefix = sys.argv[1]
out = []

def step(what, fn):
    try:
        out.append([what, fn()])
    except Exception as exc:
        out.append([what, type(exc).__name__])

s = sem_open(prefix + "a", O_CREAT | O_EXCL, 0o600, 1, flags=USE_ESEM)
step("post", s.post)
step("value", s.getvalue)
step("wait", s.wait)
step("trywait", s.trywait)
step("trywait-empty", s.trywait)
step("timedwait-empty", lambda: s.timedwait(0.01))
step("value", s.getvalue)
key = bytes(range(32))
k = sem_open(prefix + "k", O_CREAT | O_EXCL, 0o600, 2, flags=USE_ESEM, key=key)
step("keyed-wait", k.wait)
step("keyed-post", k.post)
step("keyed-value", k.getvalue)
step("wrong-key", lambda: sem_open(prefix + "k", 0, flags=USE_ESEM, key=bytes(32)))
step("no-key", lambda: sem_open(prefix + "k", 0, flags=USE_ESEM).getvalue())
step("exists", lambda: sem_open(prefix + "a", O_CREAT | O_EXCL, 0o600, 1, flags=USE_ESEM))
step("close", s.close)
step("closed-post", s.post)
step("unlink", lambda: esem.sem_unlink(prefix + "a", flags=USE_ESEM))
step("unlink-again", lambda: esem.sem_unlink(prefix + "a", flags=USE_ESEM))
step("keyed-unlink", k.unlink)
print(json.dumps({"transport": esem.get_client().transport, "steps": out}))
"""


# What the script must see, whichever codec and client: grants, refusals, key binding.
EXPECTED = [
    ["post", None], ["value", 2], ["wait", None], ["trywait", None],
    ["trywait-empty", "BusyError"], ["timedwait-empty", "BusyError"], ["value", 0],
    ["keyed-wait", None], ["keyed-post", None], ["keyed-value", 2],
    ["wrong-key", "KeyRejected"], ["no-key", "KeyRejected"],
    ["exists", "ExistentialError"], ["close", None], ["closed-post", "ExistentialError"],
    ["unlink", None], ["unlink-again", "ExistentialError"], ["keyed-unlink", None],
]


@pytest.fixture(params=["native", "python"])
def daemon(request: pytest.FixtureRequest,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, EmbeddedService]]:
    monkeypatch.setenv(CODEC_ENV, request.param)
    with EmbeddedService() as svc:
        yield request.param, svc


def run_client(svc: EmbeddedService, client: str, prefix: str) -> dict[str, object]:
    env = {**os.environ, **svc.env(), native_client.ENV: client}
    env.pop("ESEM_PUBKEY", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, prefix], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_every_codec_and_client_pair_gives_the_same_answers(
        daemon: tuple[str, EmbeddedService]) -> None:
    codec, svc = daemon
    results = {}
    for client in ("python", "native"):
        got = run_client(svc, client, f"/codec-{codec}-{client}-")
        assert got["transport"] == client
        results[client] = got["steps"]
    assert results["python"] == results["native"] == EXPECTED
    assert f"codec {codec}" in svc.log_path.read_text()


def test_an_unknown_codec_stops_the_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CODEC_ENV, "rust")
    svc = EmbeddedService()
    try:
        with pytest.raises(RuntimeError, match=f"{CODEC_ENV}='rust'"):
            svc.start()
    finally:
        svc.cleanup()
