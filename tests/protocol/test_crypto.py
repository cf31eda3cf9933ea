"""The channel cryptography: our transport is Noise's transport, byte for byte.

``Transport`` takes the two CipherStates over from noiseprotocol after the handshake and
drives cryptography's AEAD directly. These tests hold it to the library: every frame it
writes decrypts under noiseprotocol's own transport and the other way round, nonces
advance exactly as the spec says, and any tampering is the one opaque ``IntegrityError``.
"""

from __future__ import annotations

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
    welcome, server = Responder(key).respond(initiator.hello())
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
