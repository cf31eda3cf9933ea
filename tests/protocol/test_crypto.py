"""The channel cryptography: our transport is Noise's transport, byte for byte.

``Transport`` takes the two CipherStates over from noiseprotocol after the handshake and
drives cryptography's AEAD directly. These tests hold it to the library: every frame it
writes decrypts under noiseprotocol's own transport and the other way round, nonces
advance exactly as the spec says, and any tampering is the one opaque ``IntegrityError``.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from types import FrameType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from esem.errors import IntegrityError
from esem.protocol.constants import NOISE_PROLOGUE, NOISE_PROTOCOL_NAME
from esem.protocol.crypto import (
    MAX_NONCE,
    Initiator,
    Responder,
    Transport,
    generate_static_key,
    public_key_of,
    resume_verifier,
    verifier_matches,
)


def _noise_pair() -> tuple[NoiseConnection, NoiseConnection]:
    """A finished NK handshake done entirely by noiseprotocol."""
    key = generate_static_key()
    init = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
    init.set_as_initiator()
    init.set_prologue(NOISE_PROLOGUE)
    init.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, public_key_of(key))
    resp = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
    resp.set_as_responder()
    resp.set_prologue(NOISE_PROLOGUE)
    resp.set_keypair_from_private_bytes(Keypair.STATIC, key)
    init.start_handshake()
    resp.start_handshake()
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    assert init.handshake_finished and resp.handshake_finished
    return init, resp


def _pair() -> tuple[Transport, Transport]:
    key = generate_static_key()
    initiator = Initiator(public_key_of(key))
    welcome, server = Responder(key).respond(initiator.hello(), bytes(32))
    return initiator.finish(welcome), server


@given(st.lists(st.binary(max_size=200), min_size=1, max_size=20))
def test_frames_interoperate_with_noiseprotocol_both_ways(messages: list[bytes]) -> None:
    ref_init, ref_resp = _noise_pair()
    # Take the transport over from one end only; the other end stays pure noiseprotocol.
    ours_init = Transport(ref_init)
    for m in messages:
        assert bytes(ref_resp.decrypt(ours_init.encrypt(m))) == m
        assert ours_init.decrypt(bytes(ref_resp.encrypt(m))) == m


def test_session_id_is_the_handshake_hash_and_shared() -> None:
    client, server = _pair()
    assert client.session_id == server.session_id and len(client.session_id) == 32


def test_replayed_reordered_or_flipped_frames_fail_opaquely() -> None:
    client, server = _pair()
    first, second = client.encrypt(b"one"), client.encrypt(b"two")
    with pytest.raises(IntegrityError, match="frame failed authentication"):
        server.decrypt(second)  # reordered: the nonce is the counter
    assert server.decrypt(first) == b"one"  # a failure does not advance the counter
    with pytest.raises(IntegrityError, match="frame failed authentication"):
        server.decrypt(first)  # replayed
    flipped = bytearray(second)
    flipped[0] ^= 1
    with pytest.raises(IntegrityError, match="frame failed authentication"):
        server.decrypt(bytes(flipped))
    with pytest.raises(IntegrityError, match="frame failed authentication"):
        server.decrypt(b"short")  # shorter than a tag
    assert server.decrypt(second) == b"two"


def test_directions_have_separate_keys() -> None:
    client, server = _pair()
    frame = client.encrypt(b"to the service")
    with pytest.raises(IntegrityError):
        client.decrypt(frame)  # a frame reflected back at its sender
    assert server.decrypt(frame) == b"to the service"


def test_nonce_exhaustion_ends_the_session_instead_of_wrapping() -> None:
    client, server = _pair()
    client._tx.n = MAX_NONCE
    with pytest.raises(IntegrityError, match="nonces exhausted"):
        client.encrypt(b"x")
    server._rx.n = MAX_NONCE
    with pytest.raises(IntegrityError, match="nonces exhausted"):
        server.decrypt(b"\0" * 32)


# ------------------------------------------- what is tampering, what is not


class Interrupted(Exception):
    """What a signal handler raises."""


def _inside_noise_read(frame: FrameType | None) -> bool:
    # A few frames up at most: noise's code runs close under read_message, and a short
    # walk keeps the handler far quicker than the timer's interval (no nesting).
    for _ in range(12):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "read_message" and f"{os.sep}noise{os.sep}" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def _interrupt_inside_noise(prepare: Callable[[], Callable[[], object]],
                            attempts: int = 300) -> list[BaseException]:
    """Run what ``prepare`` returns under a real SIGALRM every 50 us whose handler raises
    ``Interrupted``
    only when it finds noiseprotocol's ``read_message`` on the stack: the exception then
    starts inside noise's own Python code, as a user's raising handler can. Returns what
    came out of the attempts that were interrupted there."""
    outcomes: list[BaseException] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if _inside_noise_read(frame):
            raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        for _ in range(attempts):
            run = prepare()
            try:
                signal.setitimer(signal.ITIMER_REAL, 50e-6, 50e-6)
                try:
                    run()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as exc:
                outcomes.append(exc)
                if len(outcomes) >= 5:
                    break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return outcomes


def test_a_signal_handler_raising_inside_the_handshake_is_not_tampering() -> None:
    """Both ends: an exception that a raising signal handler starts inside noise's code
    comes out as itself, never as IntegrityError (the client used to report it as
    "service failed to prove its pinned identity", the CLI as tampering, exit 4)."""
    key = generate_static_key()

    def client_end() -> Callable[[], object]:
        initiator = Initiator(public_key_of(key))
        welcome, _ = Responder(key).respond(initiator.hello(), bytes(32))
        return lambda: initiator.finish(welcome)

    def service_end() -> Callable[[], object]:
        hello = Initiator(public_key_of(key)).hello()
        responder = Responder(key)
        return lambda: responder.respond(hello, bytes(32))

    for run in (client_end, service_end):
        outcomes = _interrupt_inside_noise(run)
        assert outcomes, "no signal landed inside noise's read_message"
        assert all(type(exc) is Interrupted for exc in outcomes), outcomes


LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


@pytest.mark.parametrize("message", [
    b"", b"\x01", bytes(31), bytes(32), bytes(47), bytes(48), bytes(49), bytes(200),
    LOW_ORDER + bytes(16), bytes(32) + bytes(16), b"\xff" * 48,
], ids=lambda m: f"{len(m)}B")
def test_every_bad_handshake_message_is_an_integrity_error(message: bytes) -> None:
    """The narrowed catch still covers everything noise raises for bad input."""
    key = generate_static_key()
    initiator = Initiator(public_key_of(key))
    initiator.hello()
    with pytest.raises(IntegrityError):
        initiator.finish(message)
    with pytest.raises(IntegrityError):
        Responder(key).respond(message, bytes(32))


@given(st.binary(max_size=120))
def test_random_handshake_messages_are_integrity_errors(message: bytes) -> None:
    key = generate_static_key()
    initiator = Initiator(public_key_of(key))
    initiator.hello()
    with pytest.raises(IntegrityError):
        initiator.finish(message)
    with pytest.raises(IntegrityError):
        Responder(key).respond(message, bytes(32))


def test_session_id_is_public_an_observer_computes_it_from_the_wire() -> None:
    """PROTOCOL.md 3.3: the session id (the handshake hash) is not secret. A passive
    observer that knows the service's public key computes it from HELLO and WELCOME
    alone (Noise's MixHash chain; ``es``/``ee`` change only the chaining key), so nothing
    may rest on its secrecy: key-binding MACs are keyed by the semaphore's K."""
    key = generate_static_key()
    initiator = Initiator(public_key_of(key))
    hello = initiator.hello()
    welcome, server = Responder(key).respond(hello, bytes(32))
    client = initiator.finish(welcome)

    def blake2s(data: bytes) -> bytes:
        return hashlib.blake2s(data).digest()

    h = blake2s(NOISE_PROTOCOL_NAME)  # the name is longer than HASHLEN: hashed
    for public in (NOISE_PROLOGUE, public_key_of(key), hello[:32], hello[32:],
                   welcome[:32], welcome[32:]):
        h = blake2s(h + public)
    assert h == client.session_id == server.session_id


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_a_welcome_whose_payload_is_not_a_32_byte_secret_is_refused(size: int) -> None:
    """PROTOCOL.md 16.1: WELCOME's payload is exactly the 32-byte resumption secret; a
    service (or a forger with its key) that sends another size is refused."""
    from noise.connection import Keypair, NoiseConnection

    key = generate_static_key()
    initiator = Initiator(public_key_of(key))
    hello = initiator.hello()
    noise = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
    noise.set_as_responder()
    noise.set_prologue(NOISE_PROLOGUE)
    noise.set_keypair_from_private_bytes(Keypair.STATIC, key)
    noise.start_handshake()
    noise.read_message(hello)
    welcome = bytes(noise.write_message(bytes(size)))
    with pytest.raises(IntegrityError):
        initiator.finish(welcome)
    assert initiator.secret is None


def test_the_welcome_carries_the_secret_and_the_verifier_is_its_hash() -> None:
    key = generate_static_key()
    initiator = Initiator(public_key_of(key))
    secret = bytes(range(32))
    welcome, _ = Responder(key).respond(initiator.hello(), secret)
    assert len(welcome) == 80  # NOISE_WELCOME_BYTES
    initiator.finish(welcome)
    assert initiator.secret == secret
    verifier = resume_verifier(secret)
    assert verifier == hashlib.blake2s(secret).digest() and verifier != secret
    assert verifier_matches(verifier, secret)
    assert not verifier_matches(verifier, bytes(32))
    with pytest.raises(ValueError):
        Responder(key).respond(Initiator(public_key_of(key)).hello(), bytes(31))
