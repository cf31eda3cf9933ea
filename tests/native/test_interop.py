"""The Rust protocol crate (``native/esem-proto``) against the Python reference, both
ways: the same vectors through both codecs (every opcode, every status, MAC'd and not,
malformed messages rejected by both with the same class of error), the Noise NK
handshake with either side as initiator (identical session ids and transport bytes),
the client session state machine against the Python service session, and equal
key-binding MACs. Resumption (PROTOCOL.md 16): the WELCOME's secret both ways, RESUME
and END vectors, and a Rust client session resumed by the Python service session.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from esem.core.status import Status
from esem.core.table import WaitMode
from esem.errors import IntegrityError, ProtocolError, QuotaExceeded
from esem.protocol.constants import (
    MAX_MESSAGE_BYTES,
    NOISE_PROLOGUE,
    NOISE_PROTOCOL_NAME,
    RESUME_MAX_AWAITED,
    Direction,
    Opcode,
    OpenFlag,
)
from esem.protocol.crypto import (
    Initiator,
    Responder,
    Transport,
    generate_static_key,
    keybind_mac,
    public_key_of,
    resume_verifier,
)
from esem.protocol.frames import FrameDecoder, encode_frame
from esem.protocol.messages import (
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from esem.protocol.session import ClientSession, HelloIn, ServerSession, seal_reply

from .conftest import Interop

H = bytes(range(16))


def req_dict(r: Request) -> dict[str, Any]:
    return {
        "opcode": r.opcode.name, "req_id": r.req_id, "handle": r.handle.hex(), "name": r.name,
        "oflag": int(r.oflag), "mode": r.mode, "value": r.value,
        "key": r.key.hex() if r.key else None, "wait_mode": r.wait_mode.name,
        "timeout_ns": r.timeout_ns, "target": r.target, "after": r.after,
        "session": r.session.hex(), "secret": r.secret.hex(), "awaited": list(r.awaited),
    }


def rep_dict(r: Reply) -> dict[str, Any]:
    return {
        "opcode": r.opcode.name, "req_id": r.req_id, "status": r.status.name,
        "handle": r.handle.hex(), "created": r.created, "sem_id": r.sem_id, "value": r.value,
        "data": r.data.hex(), "message": r.message,
    }


def requests() -> list[Request]:
    """At least one request of every opcode, fields at their limits."""
    out = [
        Request(Opcode.OPEN, 1, name="/a", oflag=OpenFlag.NONE),
        Request(Opcode.OPEN, 2, name="/" + "n" * 251, oflag=OpenFlag(7), mode=0o7777,
                value=2**31 - 1, key=b"k" * 32),
        Request(Opcode.OPEN, 3, name="/é€", oflag=OpenFlag.CREAT, mode=0xFFFF,
                value=2**32 - 1, key=b"q" * 16),
        Request(Opcode.OPEN, 17, name="/f", oflag=OpenFlag.CREAT | OpenFlag.FOREIGN),
        Request(Opcode.OPEN, 18, name="/g", oflag=OpenFlag(15), key=b"r" * 20),
        Request(Opcode.CLOSE, 4, handle=H),
        Request(Opcode.UNLINK, 5, name="/u"),
        Request(Opcode.WAIT, 6, handle=H, wait_mode=WaitMode.TRY),
        Request(Opcode.WAIT, 7, handle=H, wait_mode=WaitMode.BLOCK),
        Request(Opcode.WAIT, 8, handle=H, wait_mode=WaitMode.TIMED, timeout_ns=2**63 - 1),
        Request(Opcode.POST, 2**64 - 1, handle=H),
        Request(Opcode.GETVALUE, 10, handle=H),
        Request(Opcode.CANCEL, 11, target=2**64 - 1),
        Request(Opcode.ATTACH, 12, handle=H),
        Request(Opcode.LIST, 13, after=""),
        Request(Opcode.LIST, 19, after="/a/b é€"),
        Request(Opcode.LIST, 20, after="z" * 252),
        Request(Opcode.STAT, 14, name="/s"),
        Request(Opcode.PING, 15),
        Request(Opcode.SWITCHLESS, 16),
        Request(Opcode.RECLAIM, 21, name="/r"),
        Request(Opcode.RESUME, 22, session=bytes(range(32)), secret=b"\xee" * 32),
        Request(Opcode.RESUME, 23, session=b"\x01" * 32, secret=bytes(range(32, 64)),
                awaited=(1, 2**64 - 1, 7)),
        # More than RESUME_MAX_AWAITED parses on both sides (the service answers EINVAL).
        Request(Opcode.RESUME, 2**64 - 1, session=b"s" * 32, secret=b"r" * 32,
                awaited=tuple(range(1, RESUME_MAX_AWAITED + 2))),
        Request(Opcode.END, 24),
    ]
    assert {r.opcode for r in out} == set(Opcode)
    return out


def replies() -> list[Reply]:
    """Every opcode's OK reply and every refusal status."""
    out: list[Reply] = []
    for i, op in enumerate(Opcode):
        if op in (Opcode.OPEN, Opcode.ATTACH):
            # the sem_id at both ends of its range
            out.append(Reply(op, i, Status.OK, handle=H, created=op is Opcode.OPEN,
                             sem_id=2**64 - 1 if op is Opcode.OPEN else 1))
        elif op in (Opcode.GETVALUE, Opcode.CANCEL, Opcode.SWITCHLESS, Opcode.RECLAIM):
            out.append(Reply(op, i, Status.OK, value=2**32 - 1 - i))
        elif op in (Opcode.LIST, Opcode.STAT):
            out.append(Reply(op, i, Status.OK, data=b'{"total": 0, "entries": []}'))
        elif op is Opcode.RESUME:  # last_req_id: a u64
            out.append(Reply(op, i, Status.OK, value=2**64 - 1 - i))
            out.append(Reply(op, 2**64 - 1, Status.OK, value=0))
        else:
            out.append(Reply(op, i, Status.OK))
    for st in Status:
        if st is not Status.OK:
            out.append(Reply(Opcode.WAIT, 100 + st, st, message=f"refused: {st.name} é"))
    out.append(Reply(Opcode.POST, 200, Status.EINVAL, message="x" * MAX_MESSAGE_BYTES))
    out.append(Reply(Opcode.POST, 201, Status.EINVAL, message=""))
    # A reply lost across a restart, under RESUME's opcode; refused resumptions.
    out.append(Reply(Opcode.RESUME, 202, Status.ESTALE,
                     message="reply lost across a service restart"))
    out.append(Reply(Opcode.RESUME, 203, Status.ENOENT, message="no such session"))
    out.append(Reply(Opcode.RESUME, 204, Status.EACCES, message="not your session"))
    return out


def py_outcome(decode: Any, data: bytes) -> tuple[str, Any]:
    try:
        msg, signed, mac = decode(data)
    except ProtocolError:
        return "ProtocolError", None
    d = req_dict(msg) if isinstance(msg, Request) else rep_dict(msg)
    return "ok", (d, signed.hex(), mac.hex() if mac else None)


def rust_outcome(tool: Interop, op: str, data: bytes) -> tuple[str, Any]:
    a = tool.call(op=op, hex=data.hex())
    if not a["ok"]:
        return a["class"], None
    key = "request" if op == "decode_request" else "reply"
    assert a["reencoded"] == data.hex(), "Rust decoding is not canonical"
    return "ok", (a[key], a["signed"], a["mac"])


@pytest.mark.parametrize("mac", [False, True])
def test_request_vectors_both_ways(interop: Interop, mac: bool) -> None:
    for req in requests():
        raw = encode_request(req, mac=mac)
        wire = raw + (bytes(range(32)) if mac else b"")
        # Python bytes -> Rust decoder: same fields, canonical re-encoding.
        assert rust_outcome(interop, "decode_request", wire) == py_outcome(decode_request, wire)
        # Python fields -> Rust encoder: the same bytes.
        assert interop.ok(op="encode_request", request=req_dict(req), mac=mac)["hex"] == raw.hex()


@pytest.mark.parametrize("mac", [False, True])
def test_reply_vectors_both_ways(interop: Interop, mac: bool) -> None:
    for rep in replies():
        raw = encode_reply(rep, mac=mac)
        wire = raw + (bytes(range(32, 64)) if mac else b"")
        assert rust_outcome(interop, "decode_reply", wire) == py_outcome(decode_reply, wire)
        d = rep_dict(rep) | {"message_raw": rep.message.encode()[:MAX_MESSAGE_BYTES].hex()}
        assert interop.ok(op="encode_reply", reply=d, mac=mac)["hex"] == raw.hex()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        if kind == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1 and b:
            b[rng.randrange(len(b))] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF, 16, 32, 252, 253])
        elif kind == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif kind == 3 and b:
            del b[rng.randrange(len(b))]
        elif kind == 4:
            del b[rng.randrange(len(b) + 1):]
        else:
            b += rng.randbytes(rng.randrange(40))
    return bytes(b)


@pytest.mark.parametrize("which", ["decode_request", "decode_reply"])
def test_malformed_messages_get_the_same_verdict(interop: Interop, which: str) -> None:
    """Differential fuzz: mutations of valid messages get the same outcome from both
    decoders: both refuse (ProtocolError) or both accept with the same fields."""
    rng = random.Random(which)
    if which == "decode_request":
        seeds = [encode_request(r, mac=m) + (b"\x07" * 32 if m else b"")
                 for r in requests() for m in (False, True)]
        decode: Any = decode_request
    else:
        seeds = [encode_reply(r, mac=m) + (b"\x07" * 32 if m else b"")
                 for r in replies() for m in (False, True)]
        decode = decode_reply
    hand_made = [b"", b"\x01", b"\x02" + bytes(12), b"\x01\x0d" + bytes(11),
                 b"\x01\x0e" + bytes(11),
                 b"\x01\x01\x02" + bytes(10), b"\x01\x0b\x01" + bytes(10), bytes(16369)]
    # Every byte of every short seed set to each boundary value (this reaches each field
    # rule: created 2, wait mode 3, key and name lengths, flag bits), then random
    # mutations of any seed.
    specials = (0, 1, 2, 3, 4, 8, 15, 16, 17, 32, 33, 0x7F, 0x80, 0xFF, 252, 253)
    exhaustive = [s[:i] + bytes((v,)) + s[i + 1:]
                  for s in seeds if len(s) <= 80 for i in range(len(s)) for v in specials]
    refused = 0
    cases = hand_made + exhaustive + [_mutate(rng, rng.choice(seeds)) for _ in range(3000)]
    for data in cases:
        py = py_outcome(decode, data)
        assert rust_outcome(interop, which, data) == py, data.hex()
        refused += py[0] != "ok"
    assert refused > 500  # the mutations reach the refusals, not only valid messages


def test_frames_same_on_both_sides(interop: Interop) -> None:
    bodies = [b"a", bytes(300), b"\xff" * 16384]
    stream = b"".join(encode_frame(b) for b in bodies)
    for chunk in (1, 3, 4, 5, 1000, len(stream)):
        a = interop.ok(op="frames", hex=stream.hex(), chunk=chunk)
        assert a["frames"] == [b.hex() for b in bodies] and a["buffered"] == 0
    for bad in (b"\x00\x00\x00\x00", b"\x00\x00\x40\x01", b"\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(bad)
        assert interop.call(op="frames", hex=bad.hex(), chunk=1)["class"] == "ProtocolError"


def test_rust_initiator_python_responder(interop: Interop) -> None:
    private = generate_static_key()
    responder = Responder(private)
    hello = bytes.fromhex(interop.ok(op="initiator", public=public_key_of(private).hex())["hello"])
    secret = os.urandom(32)
    welcome, transport = responder.respond(hello, secret)
    assert len(welcome) == 80
    done = interop.ok(op="finish", welcome=welcome.hex())
    assert done["session_id"] == transport.session_id.hex()
    assert done["secret"] == secret.hex()  # the WELCOME's payload is R, exactly
    for msg in (b"x", bytes(100), os.urandom(1000)):
        # Rust -> Python and Python -> Rust, counters advancing in step.
        ct = bytes.fromhex(interop.ok(op="encrypt", hex=msg.hex())["hex"])
        assert transport.decrypt(ct) == msg
        back = transport.encrypt(msg[::-1])
        assert bytes.fromhex(interop.ok(op="decrypt", hex=back.hex())["hex"]) == msg[::-1]
    # A tampered frame fails authentication on the Rust side.
    bad = bytearray(transport.encrypt(b"grant"))
    bad[0] ^= 1
    assert interop.call(op="decrypt", hex=bytes(bad).hex())["class"] == "IntegrityError"


def test_python_initiator_rust_responder(interop: Interop) -> None:
    private = generate_static_key()
    initiator = Initiator(public_key_of(private))
    interop.ok(op="responder", private=private.hex())
    secret = os.urandom(32)
    a = interop.ok(op="respond", hello=initiator.hello().hex(), secret=secret.hex())
    transport = initiator.finish(bytes.fromhex(a["welcome"]))
    assert a["session_id"] == transport.session_id.hex()
    assert initiator.secret == secret
    ct = transport.encrypt(b"request")
    assert interop.ok(op="decrypt", hex=ct.hex())["hex"] == b"request".hex()
    reply = bytes.fromhex(interop.ok(op="encrypt", hex=b"reply".hex())["hex"])
    assert transport.decrypt(reply) == b"reply"
    # A HELLO sealed to another key fails at the Rust responder, as at the Python one.
    interop.ok(op="responder", private=private.hex())
    stranger = Initiator(public_key_of(generate_static_key()))
    assert interop.call(op="respond", hello=stranger.hello().hex(),
                        secret=secret.hex())["class"] == "IntegrityError"
    # A WELCOME from a service with another key fails at the Rust initiator.
    interop.ok(op="initiator", public=public_key_of(private).hex())
    other = generate_static_key()
    welcome, _ = Responder(other).respond(Initiator(public_key_of(other)).hello(), secret)
    assert interop.call(op="finish", welcome=welcome.hex())["class"] == "IntegrityError"


@pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")
def test_fixed_ephemeral_gives_identical_bytes(interop: Interop) -> None:
    """With the same ephemeral key, the Rust and Python initiators produce the same HELLO,
    derive the same session id from one WELCOME, and seal identical transport bytes."""
    from noise.connection import Keypair, NoiseConnection

    from esem.protocol.constants import NOISE_PROLOGUE, NOISE_PROTOCOL_NAME

    private = generate_static_key()
    ephemeral = generate_static_key()
    noise = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
    noise.set_as_initiator()
    noise.set_prologue(NOISE_PROLOGUE)
    noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, public_key_of(private))
    noise.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    noise.start_handshake()
    py_hello = bytes(noise.write_message(b""))
    rust_hello = interop.ok(op="initiator", public=public_key_of(private).hex(),
                            ephemeral=ephemeral.hex())["hello"]
    assert rust_hello == py_hello.hex()
    welcome, service = Responder(private).respond(py_hello, b"\x42" * 32)
    assert noise.read_message(welcome) == b"\x42" * 32
    py = Transport(noise)
    sid = interop.ok(op="finish", welcome=welcome.hex())["session_id"]
    assert sid == py.session_id.hex() == service.session_id.hex()
    for msg in (b"a", bytes(500), b"\x01" * 16368):
        assert interop.ok(op="encrypt", hex=msg.hex())["hex"] == py.encrypt(msg).hex()


def test_keybind_macs_equal(interop: Interop) -> None:
    rng = random.Random(7)
    for _ in range(200):
        key = rng.randbytes(rng.randint(16, 32))
        sid = rng.randbytes(32)
        message = rng.randbytes(rng.randrange(400))
        direction = rng.choice(list(Direction))
        a = interop.ok(op="mac", key=key.hex(), session_id=sid.hex(), direction=int(direction),
                       message=message.hex())
        assert a["mac"] == keybind_mac(key, sid, direction, message).hex()


def _rust_client(interop: Interop, server: ServerSession, public: bytes) -> str:
    hello = bytes.fromhex(interop.ok(op="client_new", public=public.hex())["hex"])
    server.receive_data(hello)
    sid: str = interop.ok(op="client_receive", hex=server.data_to_send().hex())["session_id"]
    return sid


@pytest.mark.parametrize("codec", ["python", "native"])  # the service's transport codec
def test_rust_client_session_against_python_service_session(interop: Interop,
                                                            codec: str) -> None:
    private = generate_static_key()
    public = public_key_of(private)
    server = ServerSession(private, codec=codec)
    assert _rust_client(interop, server, public) == server.session_id.hex()
    key = b"K" * 24
    # A key-bound OPEN: the Python service verifies the Rust client's MAC and MACs back.
    opened = interop.ok(op="client_send", key=key.hex(), request={
        "opcode": "OPEN", "name": "/k", "oflag": 1, "mode": 0o600, "value": 1,
        "key": key.hex()})
    (event,) = server.receive_data(bytes.fromhex(opened["hex"]))
    assert event.request.req_id == opened["req_id"] == 1 and event.mac is not None
    server.authenticator(event)(key)  # raises unless the MAC verifies
    server.send_reply(Reply(Opcode.OPEN, 1, Status.OK, handle=H, created=True, sem_id=9),
                      mac_key=key)
    got = interop.ok(op="client_receive", hex=server.data_to_send().hex())["replies"]
    assert got == [rep_dict(Reply(Opcode.OPEN, 1, Status.OK, handle=H, created=True,
                                  sem_id=9))]
    # A POST on it whose OK reply lacks the MAC: the Rust client refuses the grant.
    sent = interop.ok(op="client_send", key=key.hex(), request={"opcode": "POST",
                                                                "handle": H.hex()})
    server.receive_data(bytes.fromhex(sent["hex"]))
    server.send_reply(Reply(Opcode.POST, sent["req_id"], Status.OK))
    bad = interop.call(op="client_receive", hex=server.data_to_send().hex())
    assert bad["class"] == "IntegrityError"
    # Sticky: the session stays failed.
    assert interop.call(op="client_send", request={"opcode": "PING"})["class"] == "IntegrityError"


def test_refused_maps_to_the_same_status(interop: Interop) -> None:
    """The service's REFUSED frame: Python raises QuotaExceeded (EDQUOT); the Rust
    client returns Refused with EDQUOT, from the same bytes."""
    private = generate_static_key()
    server = ServerSession(private)
    server.refuse(Status.EDQUOT, "quota")
    refused = server.data_to_send()
    client = ClientSession(public_key_of(private))
    client.start()
    with pytest.raises(QuotaExceeded):
        client.receive_data(refused)
    interop.ok(op="client_new", public=public_key_of(private).hex())
    a = interop.call(op="client_receive", hex=refused.hex())
    assert (a["class"], a["status"]) == ("Refused", "EDQUOT")


def test_rust_client_rejects_tampered_reply(interop: Interop) -> None:
    private = generate_static_key()
    server = ServerSession(private)
    _rust_client(interop, server, public_key_of(private))
    sent = interop.ok(op="client_send", request={"opcode": "GETVALUE", "handle": H.hex()})
    server.receive_data(bytes.fromhex(sent["hex"]))
    server.send_reply(Reply(Opcode.GETVALUE, sent["req_id"], Status.OK, value=1))
    frame = bytearray(server.data_to_send())
    frame[-1] ^= 0x80
    assert interop.call(op="client_receive", hex=bytes(frame).hex())["class"] == "IntegrityError"
    # The Python client refuses the same bytes with the same class.
    py_server = ServerSession(private)
    py_client = ClientSession(public_key_of(private))
    py_server.receive_data(py_client.start())
    py_client.receive_data(py_server.data_to_send())
    py_client.send_request(Request(Opcode.GETVALUE, 1, handle=H))
    py_server.send_reply(Reply(Opcode.GETVALUE, 1, Status.OK, value=1))
    frame = bytearray(py_server.data_to_send())
    frame[-1] ^= 0x80
    with pytest.raises(IntegrityError):
        py_client.receive_data(bytes(frame))


def test_refused_after_hello_reaches_the_rust_client(interop: Interop) -> None:
    """PROTOCOL.md 3.2: the service may refuse after it has read the HELLO (the session
    quota is checked then). The Rust client, in AWAIT_WELCOME, maps that REFUSED as it
    maps one sent at accept: Refused with the status, the session closed."""
    private = generate_static_key()
    server = ServerSession(private)
    hello = bytes.fromhex(interop.ok(op="client_new", public=public_key_of(private).hex())["hex"])
    server.feed(hello)
    assert isinstance(server.next_event(), HelloIn)  # the shell now checks the quota
    server.refuse(Status.EDQUOT, "uid 0 has 128 sessions (limit)")
    a = interop.call(op="client_receive", hex=server.data_to_send().hex())
    assert (a["class"], a["status"]) == ("Refused", "EDQUOT")
    assert interop.call(op="client_send", request={"opcode": "PING"})["class"] == "Refused"


@pytest.mark.parametrize("opcode", ["STAT", "RECLAIM"])
def test_rust_client_keyed_stat_and_reclaim(interop: Interop, opcode: str) -> None:
    """STAT and RECLAIM of a key-bound semaphore carry the MAC (PROTOCOL.md 8.2) that the
    Python service verifies, and the Rust client takes the OK reply only MAC'd back."""
    private = generate_static_key()
    server = ServerSession(private)
    _rust_client(interop, server, public_key_of(private))
    key = b"S" * 20
    op = Opcode[opcode]
    ok = (Reply(op, 1, Status.OK, data=b'{"value": 1}') if op is Opcode.STAT
          else Reply(op, 1, Status.OK, value=3))
    sent = interop.ok(op="client_send", key=key.hex(), request={"opcode": opcode, "name": "/k"})
    (event,) = server.receive_data(bytes.fromhex(sent["hex"]))
    assert event.request == Request(op, 1, name="/k") and event.mac is not None
    server.authenticator(event)(key)  # raises unless the MAC verifies
    server.send_reply(ok, mac_key=key)
    assert interop.ok(op="client_receive", hex=server.data_to_send().hex())["replies"] == [
        rep_dict(ok)]
    # The same OK reply without the MAC: refused, a full STAT / a count is not trusted.
    sent = interop.ok(op="client_send", key=key.hex(), request={"opcode": opcode, "name": "/k"})
    server.receive_data(bytes.fromhex(sent["hex"]))
    server.send_reply(Reply(op, sent["req_id"], Status.OK, data=ok.data, value=ok.value))
    assert interop.call(op="client_receive", hex=server.data_to_send().hex())["class"] == (
        "IntegrityError")


@pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")
@pytest.mark.parametrize("length", [0, 16, 31, 33, 48])
def test_welcome_payload_other_than_32_bytes_is_refused_by_both(
    interop: Interop, length: int
) -> None:
    """A WELCOME that is a valid NK message 2 from the pinned service but whose payload
    is not exactly the 32-byte resumption secret: both initiators refuse it as a forged
    one (IntegrityError), so no session ever runs without a secret."""
    from noise.connection import Keypair, NoiseConnection

    private = generate_static_key()
    for side in ("rust", "python"):
        if side == "rust":
            hello = bytes.fromhex(
                interop.ok(op="initiator", public=public_key_of(private).hex())["hello"])
        else:
            py_initiator = Initiator(public_key_of(private))
            hello = py_initiator.hello()
        noise = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
        noise.set_as_responder()
        noise.set_prologue(NOISE_PROLOGUE)
        noise.set_keypair_from_private_bytes(Keypair.STATIC, private)
        noise.start_handshake()
        noise.read_message(hello)
        welcome = bytes(noise.write_message(b"\x07" * length))
        if side == "rust":
            assert interop.call(op="finish", welcome=welcome.hex())["class"] == "IntegrityError"
        else:
            with pytest.raises(IntegrityError):
                py_initiator.finish(welcome)


def test_rust_client_resumed_by_the_python_service_session(interop: Interop) -> None:
    """A Rust client session loses its connection with requests in flight and resumes
    on a new one against the Python service session: its RESUME names the original
    session id and secret and lists the awaited ids; the service's replay (its sealed
    plaintext under the original id), an ESTALE under RESUME's opcode, and then the
    re-sent requests, byte-identical to what the first connection would have carried,
    with MACs the Python service verifies under the original id."""
    private = generate_static_key()
    public = public_key_of(private)
    first = ServerSession(private)
    h = bytes.fromhex(_rust_client(interop, first, public))
    assert first.verifier is not None
    key = b"K" * 24
    post = {"opcode": "POST", "handle": H.hex()}
    sent = [interop.ok(op="client_send", key=key.hex(), request=post) for _ in range(3)]
    assert [x["req_id"] for x in sent] == [1, 2, 3]
    # 1 and 2 reach the service; 3 is lost with the connection.
    events = first.receive_data(bytes.fromhex(sent[0]["hex"] + sent[1]["hex"]))
    assert [e.request.req_id for e in events] == [1, 2]
    replay = seal_reply(Reply(Opcode.POST, 1, Status.OK), h, key)  # in the replay window
    interop.ok(op="client_detach")
    queued = interop.ok(op="client_send", request={"opcode": "PING"})
    assert queued["req_id"] == 4 and queued["hex"] == ""  # queued while detached
    # A new connection; the Python service's WELCOME carries its own secret.
    second = ServerSession(private)
    hello = bytes.fromhex(interop.ok(op="client_reconnect", public=public.hex())["hex"])
    second.receive_data(hello)
    out = interop.ok(op="client_receive", hex=second.data_to_send().hex())["outgoing"]
    (resume,) = second.receive_data(bytes.fromhex(out))
    assert resume.mac is None
    assert resume.request == Request(Opcode.RESUME, 5, session=h,
                                     secret=resume.request.secret, awaited=(1, 2, 3, 4))
    assert resume_verifier(resume.request.secret) == first.verifier
    second.adopt(h, 2, 5)
    second.send_reply(Reply(Opcode.RESUME, 5, Status.OK, value=2))
    second.send_body(replay)
    second.send_reply(Reply(Opcode.RESUME, 2, Status.ESTALE,
                            message="reply lost across a service restart"))
    got = interop.ok(op="client_receive", hex=second.data_to_send().hex())
    assert got["replies"] == [
        rep_dict(Reply(Opcode.POST, 1, Status.OK)),
        rep_dict(Reply(Opcode.RESUME, 2, Status.ESTALE,
                       message="reply lost across a service restart")),
    ]
    assert got["session_id"] == h.hex()  # the session keeps its id
    assert got["secret"] != resume.request.secret.hex()  # rotated to the new WELCOME's
    assert second.verifier == resume_verifier(bytes.fromhex(got["secret"]))
    # The re-sends: 3 and 4, in order; 3's MAC verifies under the original id.
    resent = second.receive_data(bytes.fromhex(got["outgoing"]))
    assert [e.request.req_id for e in resent] == [3, 4]
    assert resent[0].request == Request(Opcode.POST, 3, handle=H) and resent[0].mac
    second.authenticator(resent[0])(key)
    second.send_reply(Reply(Opcode.POST, 3, Status.OK), mac_key=key)
    second.send_reply(Reply(Opcode.PING, 4, Status.OK))
    got = interop.ok(op="client_receive", hex=second.data_to_send().hex())
    assert [r["req_id"] for r in got["replies"]] == [3, 4]
    nxt = interop.ok(op="client_send", request={"opcode": "END"})
    assert nxt["req_id"] == 6
    (end,) = second.receive_data(bytes.fromhex(nxt["hex"]))
    assert end.request == Request(Opcode.END, 6)


def test_rust_client_refused_resume_is_service_unavailable(interop: Interop) -> None:
    private = generate_static_key()
    public = public_key_of(private)
    _rust_client(interop, ServerSession(private), public)
    interop.ok(op="client_send", request={"opcode": "PING"})
    interop.ok(op="client_detach")
    second = ServerSession(private)
    second.receive_data(bytes.fromhex(
        interop.ok(op="client_reconnect", public=public.hex())["hex"]))
    out = interop.ok(op="client_receive", hex=second.data_to_send().hex())["outgoing"]
    (resume,) = second.receive_data(bytes.fromhex(out))
    second.send_reply(Reply(Opcode.RESUME, resume.request.req_id, Status.ENOENT,
                            message="no such session"))
    a = interop.call(op="client_receive", hex=second.data_to_send().hex())
    assert a["class"] == "ServiceUnavailable" and "could not be resumed" in a["message"]
    assert interop.call(op="client_send", request={"opcode": "PING"})["class"] == (
        "ServiceUnavailable")
