#!/usr/bin/env python3
"""Coverage-guided fuzz target for esem's wire decoders (atheris / libFuzzer).

Run on demand, not in CI (the name has no ``test_`` prefix, so pytest never collects it)::

    pip install atheris
    python tests/fuzz/fuzz_decoder.py                      # fuzz until a crash or ^C
    python tests/fuzz/fuzz_decoder.py -atheris_runs=200000  # a bounded run
    python tests/fuzz/fuzz_decoder.py --write-corpus corpus/ && \\
        python tests/fuzz/fuzz_decoder.py corpus/           # start from valid messages

The first input byte picks the target (``decode_request``, ``decode_reply`` or
``FrameDecoder``); the rest is the input. The invariant, the same as
``tests/protocol/test_fuzz.py`` checks with hypothesis:

* a decoder either parses or raises ``esem.errors.ProtocolError``; any other exception
  is a crash;
* what parses is canonical: it re-encodes to exactly the input (a refusal's text may be
  decoded leniently, with U+FFFD for invalid UTF-8);
* ``FrameDecoder`` fed the input whole and byte by byte agrees: both raise
  ``ProtocolError`` or both yield the same frames and keep the same bytes buffered.

Without atheris the script says so and exits 0.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Find esem without importing it: atheris must see its modules imported for the first
# time under instrumentation.
if importlib.util.find_spec("esem") is None:  # a checkout without ``pip install -e .``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

TARGETS = ("request", "reply", "frames")


def make_target(m: Any) -> Callable[[bytes], None]:
    """The fuzz entry point over modules ``m`` (a namespace holding the decoders), so
    they can be imported under atheris' instrumentation first."""
    protocol_error = m.ProtocolError

    def check_request(data: bytes) -> None:
        try:
            req, signed, mac = m.decode_request(data)
        except protocol_error:
            return
        again = m.encode_request(req, mac=mac is not None) + (mac or b"")
        if again != data:
            raise AssertionError(f"request {req!r} parsed from {data!r} re-encodes as {again!r}")
        if signed != data[: len(data) - len(mac or b"")]:
            raise AssertionError("signed bytes are not the message before its MAC")

    def check_reply(data: bytes) -> None:
        try:
            rep, signed, mac = m.decode_reply(data)
        except protocol_error:
            return
        again = m.encode_reply(rep, mac=mac is not None) + (mac or b"")
        lenient = rep.status is not m.Status.OK and "\ufffd" in rep.message
        if again != data and not lenient:
            raise AssertionError(f"reply {rep!r} parsed from {data!r} re-encodes as {again!r}")
        if signed != data[: len(data) - len(mac or b"")]:
            raise AssertionError("signed bytes are not the message before its MAC")

    def run_frames(chunks: list[bytes]) -> tuple[list[bytes], bool, int]:
        dec = m.FrameDecoder()
        frames: list[bytes] = []
        try:
            for chunk in chunks:
                frames += dec.feed(chunk)
        except protocol_error:
            return [], True, 0
        return frames, False, dec.buffered

    def check_frames(data: bytes) -> None:
        whole = run_frames([data])
        bytewise = run_frames([data[i : i + 1] for i in range(len(data))])
        if whole != bytewise:
            raise AssertionError(f"FrameDecoder disagrees whole {whole!r} / bytewise {bytewise!r}")

    checks = (check_request, check_reply, check_frames)

    def test_one_input(data: bytes) -> None:
        if not data:
            return
        checks[data[0] % len(checks)](data[1:])

    return test_one_input


def _load() -> Any:
    from types import SimpleNamespace

    from esem.core.status import Status
    from esem.errors import ProtocolError
    from esem.protocol.frames import FrameDecoder
    from esem.protocol.messages import decode_reply, decode_request, encode_reply, encode_request

    return SimpleNamespace(
        ProtocolError=ProtocolError, Status=Status, FrameDecoder=FrameDecoder,
        decode_request=decode_request, decode_reply=decode_reply,
        encode_request=encode_request, encode_reply=encode_reply,
    )


def seeds() -> list[bytes]:
    """Valid inputs for every target, each prefixed with its selector byte."""
    from esem.core.status import Status
    from esem.core.table import WaitMode
    from esem.protocol.constants import Opcode, OpenFlag
    from esem.protocol.frames import encode_frame
    from esem.protocol.messages import Reply, Request, encode_reply, encode_request

    h = bytes(range(16))
    reqs = [
        Request(Opcode.OPEN, 1, name="/s", oflag=OpenFlag.CREAT | OpenFlag.EXCL, mode=0o600,
                value=1, key=b"k" * 16),
        Request(Opcode.CLOSE, 2, handle=h),
        Request(Opcode.UNLINK, 3, name="/s"),
        Request(Opcode.WAIT, 4, handle=h, wait_mode=WaitMode.TIMED, timeout_ns=10**9),
        Request(Opcode.POST, 5, handle=h),
        Request(Opcode.GETVALUE, 6, handle=h),
        Request(Opcode.CANCEL, 7, target=4),
        Request(Opcode.ATTACH, 8, handle=h),
        Request(Opcode.LIST, 9, after="/a"),
        Request(Opcode.STAT, 10, name="/s"),
        Request(Opcode.PING, 11),
    ]
    reps = [
        Reply(Opcode.OPEN, 1, Status.OK, handle=h, created=True),
        Reply(Opcode.GETVALUE, 6, Status.OK, value=3),
        Reply(Opcode.CANCEL, 7, Status.OK, value=1),
        Reply(Opcode.LIST, 9, Status.OK, data=b'{"total": 0, "offset": 0, "entries": []}'),
        Reply(Opcode.WAIT, 4, Status.ETIMEDOUT, message="timed wait reached its deadline"),
        Reply(Opcode.PING, 11, Status.OK),
    ]
    mac = bytes(32)
    out: list[bytes] = []
    for req in reqs:
        out += [b"\x00" + encode_request(req), b"\x00" + encode_request(req, mac=True) + mac]
    for rep in reps:
        out += [b"\x01" + encode_reply(rep), b"\x01" + encode_reply(rep, mac=True) + mac]
    out.append(b"\x02" + b"".join(encode_frame(encode_request(r)) for r in reqs))
    return out


def write_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds()):
        (directory / f"seed-{i:03d}").write_bytes(seed)
    print(f"wrote {len(seeds())} seeds to {directory}")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--write-corpus":
        write_corpus(Path(argv[2]))
        return 0
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        print(
            "fuzz_decoder: atheris is not installed, skipping "
            "(pip install atheris to run this coverage-guided fuzz target)",
            file=sys.stderr,
        )
        return 0
    with atheris.instrument_imports(include=["esem"]):
        modules = _load()
    atheris.Setup(argv, make_target(modules))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
