"""Unit tests of ``esem.protocol.messages``: every opcode's request and reply round-trips,
the MAC flag, and every way a decoder must refuse bytes that are not exactly one
well-formed message (always ``ProtocolError``, never another exception)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esem.core.limits import KEY_MAX_BYTES, KEY_MIN_BYTES, MAX_NAME_BYTES
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.errors import IntegrityError, ProtocolError
from esem.protocol.constants import (
    HANDLE_BYTES,
    MAC_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PLAINTEXT,
    MAX_TIMEOUT_NS,
    REPLY_HEADER,
    REQUEST_HEADER,
    VERSION,
    MsgFlag,
    Opcode,
    OpenFlag,
)
from esem.protocol.messages import (
    HANDLE_OPS,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

from . import REQUESTS_BY_OPCODE, U32_MAX, U64_MAX, replies, requests

REQ_HEAD = struct.calcsize(REQUEST_HEADER)
REP_HEAD = struct.calcsize(REPLY_HEADER)
H = bytes(range(HANDLE_BYTES))
K = bytes(range(KEY_MIN_BYTES))

# One canonical example per opcode, for the deterministic rejection tests.
EXAMPLE_REQUESTS = {
    Opcode.OPEN: Request(Opcode.OPEN, 7, name="/sem", oflag=OpenFlag.CREAT, mode=0o600,
                         value=3, key=K),
    Opcode.CLOSE: Request(Opcode.CLOSE, 7, handle=H),
    Opcode.UNLINK: Request(Opcode.UNLINK, 7, name="/sem"),
    Opcode.WAIT: Request(Opcode.WAIT, 7, handle=H, wait_mode=WaitMode.TIMED,
                         timeout_ns=10**9),
    Opcode.POST: Request(Opcode.POST, 7, handle=H),
    Opcode.GETVALUE: Request(Opcode.GETVALUE, 7, handle=H),
    Opcode.CANCEL: Request(Opcode.CANCEL, 7, target=6),
    Opcode.ATTACH: Request(Opcode.ATTACH, 7, handle=H),
    Opcode.LIST: Request(Opcode.LIST, 7, after="/sem-\u00e9"),
    Opcode.STAT: Request(Opcode.STAT, 7, name="/sem"),
    Opcode.PING: Request(Opcode.PING, 7),
    Opcode.SWITCHLESS: Request(Opcode.SWITCHLESS, 7),
    Opcode.RECLAIM: Request(Opcode.RECLAIM, 7, name="/sem"),
    Opcode.RESUME: Request(Opcode.RESUME, 7, session=bytes(range(32)),
                           secret=bytes(range(32, 64)), awaited=(3, 5)),
    Opcode.END: Request(Opcode.END, 7),
}
EXAMPLE_OK_REPLIES = {
    Opcode.OPEN: Reply(Opcode.OPEN, 7, Status.OK, handle=H, created=True),
    Opcode.ATTACH: Reply(Opcode.ATTACH, 7, Status.OK, handle=H),
    Opcode.GETVALUE: Reply(Opcode.GETVALUE, 7, Status.OK, value=2**31 - 1),
    Opcode.CANCEL: Reply(Opcode.CANCEL, 7, Status.OK, value=1),
    Opcode.SWITCHLESS: Reply(Opcode.SWITCHLESS, 7, Status.OK, value=65536),
    Opcode.RECLAIM: Reply(Opcode.RECLAIM, 7, Status.OK, value=3),
    Opcode.LIST: Reply(Opcode.LIST, 7, Status.OK, data=b'{"total": 0}'),
    Opcode.STAT: Reply(Opcode.STAT, 7, Status.OK, data=b'{"name": "/sem"}'),
    Opcode.RESUME: Reply(Opcode.RESUME, 7, Status.OK, value=2**64 - 1),
    **{op: Reply(op, 7, Status.OK)
       for op in (Opcode.CLOSE, Opcode.UNLINK, Opcode.WAIT, Opcode.POST, Opcode.PING,
                  Opcode.END)},
}
# Replies whose last field runs to the end of the message (opaque data or refusal text):
# extra bytes there are content, not trailing garbage.
OPEN_ENDED = {Opcode.LIST, Opcode.STAT}
FAKE_MAC = bytes(range(100, 100 + MAC_BYTES))

all_ops = pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)


def req_bytes(req: Request, mac: bool = False) -> bytes:
    return encode_request(req, mac=mac) + (FAKE_MAC if mac else b"")


def rep_bytes(rep: Reply, mac: bool = False) -> bytes:
    return encode_reply(rep, mac=mac) + (FAKE_MAC if mac else b"")


def test_example_tables_cover_every_opcode() -> None:
    assert set(EXAMPLE_REQUESTS) == set(EXAMPLE_OK_REPLIES) == set(Opcode)


def test_protocol_error_is_an_integrity_error() -> None:
    # From a pinned, authenticated peer, unparsable bytes can only mean tampering.
    assert issubclass(ProtocolError, IntegrityError)


# ------------------------------------------------------------------ round trips


@given(req=requests, mac=st.booleans())
def test_request_round_trip(req: Request, mac: bool) -> None:
    body = encode_request(req, mac=mac)
    assert body[:3] == bytes((VERSION, req.opcode, MsgFlag.HAS_MAC if mac else 0))
    assert int.from_bytes(body[3:REQ_HEAD], "big") == req.req_id
    got, signed, got_mac = decode_request(body + (FAKE_MAC if mac else b""))
    assert got == req
    assert signed == body  # the MAC covers the whole message before it, flag included
    assert got_mac == (FAKE_MAC if mac else None)


@all_ops
@given(data=st.data())
def test_request_round_trip_per_opcode(op: Opcode, data: st.DataObject) -> None:
    req = data.draw(REQUESTS_BY_OPCODE[op])
    assert decode_request(encode_request(req))[0] == req
    assert decode_request(req_bytes(req, mac=True))[0] == req


@given(rep=replies(), mac=st.booleans())
def test_reply_round_trip(rep: Reply, mac: bool) -> None:
    body = encode_reply(rep, mac=mac)
    assert body[:3] == bytes((VERSION, rep.opcode, MsgFlag.HAS_MAC if mac else 0))
    got, signed, got_mac = decode_reply(body + (FAKE_MAC if mac else b""))
    assert got == rep
    assert signed == body
    assert got_mac == (FAKE_MAC if mac else None)


@all_ops
@given(data=st.data())
def test_reply_round_trip_per_opcode(op: Opcode, data: st.DataObject) -> None:
    rep = data.draw(replies(opcode=op))
    assert decode_reply(encode_reply(rep))[0] == rep
    assert decode_reply(rep_bytes(rep, mac=True))[0] == rep


@all_ops
def test_example_requests_and_replies_round_trip(op: Opcode) -> None:
    for mac in (False, True):
        assert decode_request(req_bytes(EXAMPLE_REQUESTS[op], mac))[0] == EXAMPLE_REQUESTS[op]
        assert decode_reply(rep_bytes(EXAMPLE_OK_REPLIES[op], mac))[0] == EXAMPLE_OK_REPLIES[op]


def test_request_layouts_byte_by_byte() -> None:
    """The payload layouts PROTOCOL.md specifies."""
    head = bytes((VERSION, Opcode.OPEN, 0)) + (7).to_bytes(8, "big")
    assert encode_request(EXAMPLE_REQUESTS[Opcode.OPEN]) == (
        head + bytes((OpenFlag.CREAT,)) + (0o600).to_bytes(2, "big") + (3).to_bytes(4, "big")
        + bytes((len(K),)) + K + b"\x04/sem"
    )
    wait = encode_request(EXAMPLE_REQUESTS[Opcode.WAIT])
    assert wait[REQ_HEAD:] == H + bytes((WaitMode.TIMED,)) + (10**9).to_bytes(8, "big")
    assert encode_request(EXAMPLE_REQUESTS[Opcode.POST])[REQ_HEAD:] == H
    assert encode_request(EXAMPLE_REQUESTS[Opcode.UNLINK])[REQ_HEAD:] == b"\x04/sem"
    assert encode_request(EXAMPLE_REQUESTS[Opcode.CANCEL])[REQ_HEAD:] == (6).to_bytes(8, "big")
    assert encode_request(EXAMPLE_REQUESTS[Opcode.LIST])[REQ_HEAD:] == b"\x07/sem-\xc3\xa9"
    assert len(encode_request(EXAMPLE_REQUESTS[Opcode.PING])) == REQ_HEAD == 11


def test_reply_layouts_byte_by_byte() -> None:
    head = bytes((VERSION, Opcode.OPEN, 0)) + (7).to_bytes(8, "big") + b"\x00\x00"
    assert encode_reply(EXAMPLE_OK_REPLIES[Opcode.OPEN]) == head + H + b"\x01"
    assert encode_reply(EXAMPLE_OK_REPLIES[Opcode.GETVALUE])[REP_HEAD:] == b"\x7f\xff\xff\xff"
    assert len(encode_reply(EXAMPLE_OK_REPLIES[Opcode.POST])) == REP_HEAD == 13
    refusal = encode_reply(Reply(Opcode.POST, 7, Status.EOVERFLOW, message="full"))
    assert refusal == bytes((VERSION, Opcode.POST, 0)) + (7).to_bytes(8, "big") + b"\x00\x06full"


def test_open_key_absent_and_empty_are_the_same_on_the_wire() -> None:
    req = Request(Opcode.OPEN, 1, name="/a", key=b"")
    got = decode_request(encode_request(req))[0]
    assert got.key is None
    assert encode_request(got) == encode_request(req)


def test_refusal_carries_only_its_text() -> None:
    rep = Reply(Opcode.OPEN, 3, Status.EEXIST, handle=H, created=True, message="exists")
    got = decode_reply(encode_reply(rep))[0]
    assert got == Reply(Opcode.OPEN, 3, Status.EEXIST, message="exists")


def test_refusal_text_is_cut_to_max_message_bytes() -> None:
    rep = Reply(Opcode.POST, 1, Status.EINVAL, message="y" * (MAX_MESSAGE_BYTES + 100))
    got = decode_reply(encode_reply(rep))[0]
    assert got.message == "y" * MAX_MESSAGE_BYTES


def test_refusal_text_that_is_not_utf8_is_replaced_not_refused() -> None:
    raw = encode_reply(Reply(Opcode.POST, 1, Status.EINVAL)) + b"\xff\xfe"
    assert decode_reply(raw)[0].message == "\ufffd\ufffd"


def test_ok_reply_to_payloadless_opcode_drops_fields() -> None:
    got = decode_reply(encode_reply(Reply(Opcode.POST, 1, Status.OK, value=5, data=b"x")))[0]
    assert got == Reply(Opcode.POST, 1, Status.OK)


def test_mac_is_the_last_mac_bytes() -> None:
    raw = req_bytes(EXAMPLE_REQUESTS[Opcode.POST], mac=True)
    _, signed, mac = decode_request(raw)
    assert mac == raw[-MAC_BYTES:] and signed == raw[:-MAC_BYTES]
    assert signed[2] == MsgFlag.HAS_MAC
    rep, signed, mac = decode_reply(rep_bytes(EXAMPLE_OK_REPLIES[Opcode.STAT], mac=True))
    assert mac == FAKE_MAC and rep.data == EXAMPLE_OK_REPLIES[Opcode.STAT].data


def test_mac_on_open_ended_reply_is_not_part_of_the_data() -> None:
    rep = Reply(Opcode.LIST, 1, Status.OK, data=b"A" * 40)
    got, _, mac = decode_reply(rep_bytes(rep, mac=True))
    assert got.data == b"A" * 40 and mac == FAKE_MAC
    refusal = Reply(Opcode.WAIT, 1, Status.ETIMEDOUT, message="late")
    got, _, mac = decode_reply(rep_bytes(refusal, mac=True))
    assert got.message == "late" and mac == FAKE_MAC


# ------------------------------------------------------------------- rejections


def with_byte(raw: bytes, index: int, value: int) -> bytes:
    return raw[:index] + bytes((value,)) + raw[index + 1 :]


@all_ops
@pytest.mark.parametrize("mac", [False, True])
def test_request_rejects_trailing_bytes(op: Opcode, mac: bool) -> None:
    body = encode_request(EXAMPLE_REQUESTS[op], mac=mac)
    with pytest.raises(ProtocolError):
        decode_request(body + b"\x00" + (FAKE_MAC if mac else b""))
    if not mac:
        with pytest.raises(ProtocolError):
            decode_request(body + FAKE_MAC)  # a MAC without the flag is trailing garbage


@pytest.mark.parametrize("op", [op for op in Opcode if op not in OPEN_ENDED],
                         ids=lambda op: op.name)
@pytest.mark.parametrize("mac", [False, True])
def test_reply_rejects_trailing_bytes(op: Opcode, mac: bool) -> None:
    body = encode_reply(EXAMPLE_OK_REPLIES[op], mac=mac)
    with pytest.raises(ProtocolError):
        decode_reply(body + b"\x00" + (FAKE_MAC if mac else b""))


@all_ops
@pytest.mark.parametrize("mac", [False, True])
def test_request_rejects_every_truncation(op: Opcode, mac: bool) -> None:
    raw = req_bytes(EXAMPLE_REQUESTS[op], mac)
    for n in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode_request(raw[:n])


@all_ops
def test_reply_rejects_truncation(op: Opcode) -> None:
    raw = encode_reply(EXAMPLE_OK_REPLIES[op])
    fixed = REP_HEAD if op in OPEN_ENDED else len(raw)
    for n in range(fixed):
        with pytest.raises(ProtocolError):
            decode_reply(raw[:n])
    # With the MAC flag set, a message too short to hold a MAC is truncated.
    flagged = encode_reply(EXAMPLE_OK_REPLIES[op], mac=True)
    for n in range(REP_HEAD, REP_HEAD + MAC_BYTES):
        with pytest.raises(ProtocolError):
            decode_reply((flagged + FAKE_MAC)[:n])


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_wrong_version_is_rejected(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        decode_request(with_byte(req_bytes(EXAMPLE_REQUESTS[Opcode.PING]), 0, version))
    with pytest.raises(ProtocolError, match="version"):
        decode_reply(with_byte(rep_bytes(EXAMPLE_OK_REPLIES[Opcode.PING]), 0, version))


@pytest.mark.parametrize("opcode", [0, max(Opcode) + 1, 100, 255])
def test_unknown_opcode_is_rejected(opcode: int) -> None:
    with pytest.raises(ProtocolError, match="opcode"):
        decode_request(with_byte(req_bytes(EXAMPLE_REQUESTS[Opcode.PING]), 1, opcode))
    with pytest.raises(ProtocolError, match="opcode"):
        decode_reply(with_byte(rep_bytes(EXAMPLE_OK_REPLIES[Opcode.PING]), 1, opcode))


@pytest.mark.parametrize("flags", range(2, 256))
def test_unknown_message_flags_are_rejected(flags: int) -> None:
    # Regression: the mask was ``~MsgFlag.HAS_MAC``, which is 0 on Python >= 3.11.
    raw = req_bytes(EXAMPLE_REQUESTS[Opcode.PING], mac=True)
    with pytest.raises(ProtocolError, match="flags"):
        decode_request(with_byte(raw, 2, flags))
    raw = rep_bytes(EXAMPLE_OK_REPLIES[Opcode.PING], mac=True)
    with pytest.raises(ProtocolError, match="flags"):
        decode_reply(with_byte(raw, 2, flags))


@pytest.mark.parametrize("status", [max(Status) + 1, 255, 256, 0x7FFF, 0xFFFF])
def test_unknown_status_is_rejected(status: int) -> None:
    raw = encode_reply(EXAMPLE_OK_REPLIES[Opcode.PING])
    raw = raw[: REP_HEAD - 2] + status.to_bytes(2, "big")
    with pytest.raises(ProtocolError, match="status"):
        decode_reply(raw)


@pytest.mark.parametrize("oflag", [16, 0x18, 0x80, 0xFF])
def test_unknown_open_flags_are_rejected(oflag: int) -> None:
    raw = req_bytes(EXAMPLE_REQUESTS[Opcode.OPEN])
    with pytest.raises(ProtocolError, match="open flags"):
        decode_request(with_byte(raw, REQ_HEAD, oflag))


@pytest.mark.parametrize("wait_mode", [max(WaitMode) + 1, 0x80, 255])
def test_unknown_wait_mode_is_rejected(wait_mode: int) -> None:
    raw = req_bytes(EXAMPLE_REQUESTS[Opcode.WAIT])
    with pytest.raises(ProtocolError, match="wait mode"):
        decode_request(with_byte(raw, REQ_HEAD + HANDLE_BYTES, wait_mode))


@pytest.mark.parametrize(
    ("mode", "timeout"),
    [
        (WaitMode.TIMED, MAX_TIMEOUT_NS + 1),
        (WaitMode.TIMED, U64_MAX),
        (WaitMode.BLOCK, 1),  # a timeout only makes sense on a timed wait
        (WaitMode.TRY, 10**9),
    ],
)
def test_timeout_out_of_range_is_rejected(mode: WaitMode, timeout: int) -> None:
    raw = encode_request(Request(Opcode.WAIT, 1, handle=H))
    raw = raw[:-9] + bytes((mode,)) + timeout.to_bytes(8, "big")
    with pytest.raises(ProtocolError, match="timeout"):
        decode_request(raw)


def test_timeout_bounds_are_accepted() -> None:
    for timeout in (0, MAX_TIMEOUT_NS):
        req = Request(Opcode.WAIT, 1, handle=H, wait_mode=WaitMode.TIMED, timeout_ns=timeout)
        assert decode_request(encode_request(req))[0] == req


def _open_with(key: bytes, name: bytes) -> bytes:
    head = encode_request(Request(Opcode.OPEN, 1))[:REQ_HEAD]
    return head + struct.pack(">BHI", 1, 0o600, 0) + bytes((len(key),)) + key + \
        bytes((len(name),)) + name


@pytest.mark.parametrize("n", [*range(1, KEY_MIN_BYTES), KEY_MAX_BYTES + 1, 255])
def test_open_key_length_out_of_range_is_rejected(n: int) -> None:
    with pytest.raises(ProtocolError, match="key length"):
        decode_request(_open_with(b"k" * n, b"/a"))


@pytest.mark.parametrize("n", [KEY_MIN_BYTES, KEY_MAX_BYTES])
def test_open_key_length_bounds_are_accepted(n: int) -> None:
    assert decode_request(_open_with(b"k" * n, b"/a"))[0].key == b"k" * n


@pytest.mark.parametrize("n", [0, 1, MAX_NAME_BYTES + 2, 255])
def test_name_length_out_of_range_is_rejected(n: int) -> None:
    name = (b"/" + b"n" * 255)[:n]
    with pytest.raises(ProtocolError, match="name length"):
        decode_request(_open_with(b"", name))
    raw = encode_request(Request(Opcode.UNLINK, 1, name="/a"))[:REQ_HEAD]
    with pytest.raises(ProtocolError, match="name length"):
        decode_request(raw + bytes((n,)) + name)


def test_name_length_bounds_are_accepted() -> None:
    for name in (b"/a", b"/" + b"n" * MAX_NAME_BYTES):
        assert decode_request(_open_with(b"", name))[0].name == name.decode()


@pytest.mark.parametrize("name", [b"/\xff", b"/\xc3", b"/\xed\xa0\x80"])
def test_name_that_is_not_utf8_is_rejected(name: bytes) -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_request(_open_with(b"", name))
    raw = encode_request(Request(Opcode.STAT, 1, name="/a"))[:REQ_HEAD]
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_request(raw + bytes((len(name),)) + name)


@pytest.mark.parametrize("created", [2, 128, 255])
def test_created_flag_out_of_range_is_rejected(created: int) -> None:
    raw = encode_reply(EXAMPLE_OK_REPLIES[Opcode.OPEN])
    with pytest.raises(ProtocolError, match="created"):
        decode_reply(raw[:-1] + bytes((created,)))


def test_refusal_text_too_long_is_rejected() -> None:
    head = encode_reply(Reply(Opcode.POST, 1, Status.EINVAL))
    assert decode_reply(head + b"t" * MAX_MESSAGE_BYTES)[0].message == "t" * MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError, match="too long"):
        decode_reply(head + b"t" * (MAX_MESSAGE_BYTES + 1))


def test_oversized_messages_are_rejected() -> None:
    stat = encode_request(Request(Opcode.PING, 1))
    with pytest.raises(ProtocolError, match="too large"):
        decode_request(stat + b"\x00" * (MAX_PLAINTEXT - len(stat) + 1))
    data = encode_reply(Reply(Opcode.LIST, 1, Status.OK))
    biggest = data + b"d" * (MAX_PLAINTEXT - len(data))
    assert len(decode_reply(biggest)[0].data) == MAX_PLAINTEXT - REP_HEAD
    with pytest.raises(ProtocolError, match="too large"):
        decode_reply(biggest + b"d")


@pytest.mark.parametrize("raw", [b"", b"\x01", bytes(REQ_HEAD - 1)])
def test_short_header_is_truncated(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        decode_request(raw)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_reply(raw)


def test_handle_ops_table() -> None:
    assert {Opcode.CLOSE, Opcode.WAIT, Opcode.POST, Opcode.GETVALUE, Opcode.ATTACH} == HANDLE_OPS


@given(req=requests)
def test_any_single_bit_in_the_header_is_checked_or_significant(req: Request) -> None:
    """Flipping a header bit either is refused or yields a different request: nothing
    in the header is silently ignored."""
    raw = encode_request(req)
    for i in range(REQ_HEAD * 8):
        flipped = with_byte(raw, i // 8, raw[i // 8] ^ (1 << (i % 8)))
        try:
            got = decode_request(flipped)
        except ProtocolError:
            continue
        assert got[0] != req or got[2] is not None


def test_u32_max_is_accepted_for_fields_that_carry_it() -> None:
    open_req = Request(Opcode.OPEN, U64_MAX, name="/a", mode=0xFFFF, value=U32_MAX)
    assert decode_request(encode_request(open_req))[0] == open_req
    longest = "/" + "x" * 251
    assert decode_request(encode_request(Request(Opcode.LIST, 1, after=longest)))[0].after \
        == longest


def test_list_cursor_is_bounded_utf8() -> None:
    head = encode_request(Request(Opcode.LIST, 1))[:11]
    with pytest.raises(ProtocolError, match="cursor length"):
        decode_request(head + bytes([253]) + b"x" * 253)
    with pytest.raises(ProtocolError, match="cursor is not UTF-8"):
        decode_request(head + b"\x02\xff\xfe")
    assert decode_request(head + b"\x00")[0].after == ""


# ------------------------------------------------------------------ RESUME / END


def test_resume_request_layout() -> None:
    """PROTOCOL.md 16.2: session (32), secret (32), count u16, count u64 req_ids."""
    req = EXAMPLE_REQUESTS[Opcode.RESUME]
    body = encode_request(req)
    assert body[REQ_HEAD:] == (bytes(range(64)) + struct.pack(">H", 2)
                               + struct.pack(">QQ", 3, 5))
    assert decode_request(body)[0] == req


def test_resume_reply_carries_a_u64_last_req_id() -> None:
    body = encode_reply(Reply(Opcode.RESUME, 9, Status.OK, value=2**40 + 3))
    assert body[REP_HEAD:] == struct.pack(">Q", 2**40 + 3)


@pytest.mark.parametrize("cut", [1, 31, 32, 63, 64, 65, 66, 67, 73])
def test_a_truncated_resume_is_refused(cut: int) -> None:
    body = encode_request(EXAMPLE_REQUESTS[Opcode.RESUME])
    with pytest.raises(ProtocolError):
        decode_request(body[: len(body) - cut] if cut < len(body) - REQ_HEAD else body[:REQ_HEAD])
    with pytest.raises(ProtocolError):
        decode_request(body + b"\x00")  # a count that does not match the ids


def test_resume_misuse_is_a_value_error_before_sending() -> None:
    for session, secret in ((bytes(31), bytes(32)), (bytes(32), bytes(33))):
        with pytest.raises(ValueError):
            encode_request(Request(Opcode.RESUME, 1, session=session, secret=secret))


def test_end_has_an_empty_payload() -> None:
    assert encode_request(Request(Opcode.END, 4)) == struct.pack(REQUEST_HEADER, VERSION,
                                                                  Opcode.END, 0, 4)
    with pytest.raises(ProtocolError):
        decode_request(encode_request(Request(Opcode.END, 4)) + b"\x00")
