"""Unit tests of ``esem.protocol.frames``: ``u32 big-endian length | body`` framing.

The decoder must yield the same frames however the stream is cut into reads, and refuse
a length outside 1..MAX_FRAME_BODY as soon as its four bytes are in, so a hostile peer
never makes it buffer more than one maximal frame.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esem.errors import ProtocolError
from esem.protocol.constants import LENGTH_BYTES, MAX_FRAME_BODY
from esem.protocol.frames import FrameDecoder, encode_frame

bodies = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=64),
        st.integers(1, MAX_FRAME_BODY).map(lambda n: b"\xa5" * n),
    ),
    max_size=6,
)


def feed_chunks(chunks: list[bytes]) -> tuple[list[bytes], FrameDecoder]:
    dec = FrameDecoder()
    frames: list[bytes] = []
    for chunk in chunks:
        frames += dec.feed(chunk)
    return frames, dec


def test_encode_frame_layout() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * MAX_FRAME_BODY)[:LENGTH_BYTES] == MAX_FRAME_BODY.to_bytes(4, "big")


@pytest.mark.parametrize("n", [0, MAX_FRAME_BODY + 1])
def test_encode_frame_refuses_lengths_outside_the_range(n: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        encode_frame(b"x" * n)


@given(bodies=bodies, cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_whole_bytewise_and_any_chunking_yield_the_same_frames(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    whole, dec = feed_chunks([stream])
    assert whole == bodies and dec.buffered == 0
    if len(stream) < 40_000:  # byte by byte is quadratic in pure Python; keep it quick
        bytewise, dec = feed_chunks([stream[i : i + 1] for i in range(len(stream))])
        assert bytewise == bodies and dec.buffered == 0
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunked, dec = feed_chunks([stream[a:b] for a, b in itertools.pairwise(points)])
    assert chunked == bodies and dec.buffered == 0


@given(body=st.binary(min_size=1, max_size=100), cut=st.integers(0, 200))
def test_partial_frame_is_buffered_until_complete(body: bytes, cut: int) -> None:
    frame = encode_frame(body)
    cut %= len(frame)
    dec = FrameDecoder()
    assert dec.feed(frame[:cut]) == []
    assert dec.buffered == cut
    assert dec.feed(frame[cut:]) == [body]
    assert dec.buffered == 0


def test_empty_feed_is_harmless() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.feed(b"\x00\x00") == []
    assert dec.feed(b"") == []
    assert dec.buffered == 2


def test_maximal_frame_is_accepted() -> None:
    body = bytes(range(256)) * (MAX_FRAME_BODY // 256)
    assert len(body) == MAX_FRAME_BODY
    assert FrameDecoder().feed(encode_frame(body)) == [body]


@pytest.mark.parametrize("length", [0, MAX_FRAME_BODY + 1, 2**24, 2**32 - 1])
def test_bad_length_raises_as_soon_as_its_four_bytes_arrive(length: int) -> None:
    prefix = length.to_bytes(4, "big")
    dec = FrameDecoder()
    for b in prefix[:-1]:
        assert dec.feed(bytes((b,))) == []
    with pytest.raises(ProtocolError, match="frame length"):
        dec.feed(prefix[-1:])  # no body byte needed: the length alone is refused
    with pytest.raises(ProtocolError, match="frame length"):
        FrameDecoder().feed(prefix)


@pytest.mark.parametrize("length", [0, MAX_FRAME_BODY + 1])
def test_bad_length_after_good_frames_raises(length: int) -> None:
    good = encode_frame(b"one") + encode_frame(b"two")
    dec = FrameDecoder()
    assert dec.feed(good) == [b"one", b"two"]
    with pytest.raises(ProtocolError):
        dec.feed(length.to_bytes(4, "big"))
    # Whole, in one read: the error wins; the session that owns the decoder is closed.
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(good + length.to_bytes(4, "big"))


def test_repr_shows_buffered_bytes() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x00\x00\x00\x05ab")
    assert repr(dec) == "<FrameDecoder buffered=6>"
