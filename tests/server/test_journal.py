"""The journal's format and its verification (esem.server.journal; PROTOCOL.md 17): what
it writes reads back; every kind of tampering is a JournalError saying what it found,
except a rollback of both files to an older complete copy, which software cannot see."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esem.protocol.crypto import generate_static_key
from esem.server import journal as jr
from esem.server.journal import HEAD_NAME, JOURNAL_NAME, NEW_NAME, Journal, JournalError

KEY = generate_static_key()
SNAP = {"format": 1, "table": {"n": 1}}


@pytest.fixture
def jdir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "j"
    d.mkdir()
    yield d


def _fd(d: Path) -> int:
    return os.open(d, os.O_PATH | os.O_DIRECTORY)


def change(i: int) -> list[object]:
    """A request change of the kind the service appends (varied: queued or replied,
    tokens drawn or not, pids looked at or not)."""
    return ["req", i + 1, b"p" * (i % 7), None if i % 3 == 0 else b"b" * i, 1000.0 + i,
            1.7e9 + i, [bytes([i]) * 16] * (i % 2), None if i % 2 else [i, 7]]


def write(d: Path, records: int = 5, key: bytes = KEY, snap: dict[str, object] = SNAP,
          commit_each: bool = True) -> Journal:
    j = Journal(_fd(d), key)
    j.start(snap)
    for i in range(records):
        j.append(change(i))
        if commit_each:
            j.commit()
    j.commit()
    return j


def load(d: Path, key: bytes = KEY) -> jr.Loaded | None:
    fd = _fd(d)
    try:
        return jr.load(fd, key)
    finally:
        os.close(fd)


def offsets(d: Path) -> list[tuple[int, int]]:
    """(start, end) of every record in the journal file."""
    data = (d / JOURNAL_NAME).read_bytes()
    pos, out = jr._HEADER.size, []
    while pos < len(data):
        _, _, length = jr._REC.unpack_from(data, pos)
        out.append((pos, pos + jr._REC.size + length))
        pos += jr._REC.size + length
    return out


def test_first_start_has_no_journal(jdir: Path) -> None:
    assert load(jdir) is None


def test_what_is_written_reads_back(jdir: Path) -> None:
    write(jdir, 5).close()
    got = load(jdir)
    assert got is not None and got.version == jr.JOURNAL_VERSION == 2
    assert got.snapshot == SNAP
    assert [r for _, r in got.records] == [change(i) for i in range(5)]
    assert [s for s, _ in got.records] == [2, 3, 4, 5, 6] and got.last_seq == 6


def test_a_commit_is_one_record_of_its_changes(jdir: Path) -> None:
    j = write(jdir, 0)
    grouped: list[list[object]] = [["start", 9, 1000, 1000, 4242, b"h" * 32, b"v" * 32],
                                   change(1), ["expire", 12.5], ["detach", 9],
                                   ["resume", 9, 10, b"w" * 32], ["end", 9]]
    for c in grouped[:-1]:
        j.append(c)
    j.append_req(*grouped[1][1:])  # type: ignore[arg-type]
    j.append(grouped[-1])
    assert j.pending == 7
    j.commit()
    j.close()
    got = load(jdir)
    assert got is not None and got.records == [(2, c) for c in
                                               [*grouped[:-1], grouped[1], grouped[-1]]]
    assert len(offsets(jdir)) == 2  # the snapshot, and one record for the commit
    assert oct((jdir / JOURNAL_NAME).stat().st_mode & 0o777) == "0o600"
    assert oct((jdir / HEAD_NAME).stat().st_mode & 0o777) == "0o600"


def test_payloads_are_encrypted(jdir: Path) -> None:
    j = Journal(_fd(jdir), KEY)
    j.start({"secret-key-material": "c0ffee" * 5})
    j.close()
    assert b"c0ffee" not in (jdir / JOURNAL_NAME).read_bytes()


def test_compaction_goes_on_numbering_and_replaces_the_file(jdir: Path) -> None:
    j = write(jdir, 3)
    j.start({"format": 1, "table": {"n": 2}})
    j.append(["end", 3])
    j.close()
    got = load(jdir)
    assert got is not None and got.snapshot["table"] == {"n": 2}
    assert got.records == [(6, ["end", 3])]


def test_an_edited_record_is_detected(jdir: Path) -> None:
    write(jdir).close()
    start, end = offsets(jdir)[2]
    data = bytearray((jdir / JOURNAL_NAME).read_bytes())
    data[(start + end) // 2] ^= 1
    (jdir / JOURNAL_NAME).write_bytes(bytes(data))
    with pytest.raises(JournalError, match="does not verify"):
        load(jdir)


def test_reordered_records_are_detected(jdir: Path) -> None:
    write(jdir).close()
    (a0, a1), (b0, b1) = offsets(jdir)[2:4]
    data = (jdir / JOURNAL_NAME).read_bytes()
    swapped = data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:]
    (jdir / JOURNAL_NAME).write_bytes(swapped)
    with pytest.raises(JournalError, match="reordered or spliced"):
        load(jdir)
    # even with the seq fields rewritten to look in order, the chain fails
    fixed = bytearray(swapped)
    for i, (s, _) in enumerate(offsets(jdir)):
        fixed[s + 1 : s + 9] = (i + 1).to_bytes(8, "big")
    (jdir / JOURNAL_NAME).write_bytes(bytes(fixed))
    with pytest.raises(JournalError, match="does not verify"):
        load(jdir)


def test_a_record_spliced_from_another_journal_of_the_same_service(jdir: Path,
                                                                   tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write(jdir).close()
    write(other).close()  # same key, same seqs, another file id
    start, end = offsets(jdir)[3]
    ostart, oend = offsets(other)[3]
    data = (jdir / JOURNAL_NAME).read_bytes()
    odata = (other / JOURNAL_NAME).read_bytes()
    (jdir / JOURNAL_NAME).write_bytes(data[:start] + odata[ostart:oend] + data[end:])
    with pytest.raises(JournalError, match="does not verify"):
        load(jdir)
    # and another journal's file under this one's head
    shutil.copy(other / JOURNAL_NAME, jdir / JOURNAL_NAME)
    with pytest.raises(JournalError, match="different journals"):
        load(jdir)


def test_a_record_cut_from_the_middle_is_detected(jdir: Path) -> None:
    write(jdir).close()
    start, end = offsets(jdir)[2]
    data = (jdir / JOURNAL_NAME).read_bytes()
    (jdir / JOURNAL_NAME).write_bytes(data[:start] + data[end:])
    with pytest.raises(JournalError, match="reordered or spliced"):
        load(jdir)


def test_whole_records_cut_off_the_end_are_detected_by_the_head(jdir: Path) -> None:
    write(jdir).close()
    start, _ = offsets(jdir)[-2]
    data = (jdir / JOURNAL_NAME).read_bytes()
    (jdir / JOURNAL_NAME).write_bytes(data[:start])
    with pytest.raises(JournalError, match="cut off its end"):
        load(jdir)


def test_a_torn_last_record_beyond_the_head_is_tolerated(jdir: Path) -> None:
    j = write(jdir, 4)
    # a crash in the middle of writing the next group: part of a record, head not updated
    data = j._encode(b'[["torn","' + b"a" * 100 + b'"]]')
    with open(jdir / JOURNAL_NAME, "ab") as f:
        f.write(data[: len(data) // 2])
    got = load(jdir)
    assert got is not None and len(got.records) == 4 and got.torn == len(data) // 2
    # but a torn record the head says was committed is a cut
    (jdir / JOURNAL_NAME).write_bytes((jdir / JOURNAL_NAME).read_bytes()[:-(len(data) // 2)
                                                                         - 10])
    with pytest.raises(JournalError):
        load(jdir)


def test_a_missing_or_foreign_head_or_journal_is_refused(jdir: Path) -> None:
    write(jdir).close()
    with pytest.raises(JournalError, match="does not verify"):
        load(jdir, key=generate_static_key())  # another service's key
    head = (jdir / HEAD_NAME).read_bytes()
    (jdir / HEAD_NAME).write_bytes(head[:-1] + bytes([head[-1] ^ 1]))
    with pytest.raises(JournalError, match="does not verify"):
        load(jdir)
    (jdir / HEAD_NAME).unlink()
    with pytest.raises(JournalError, match="missing"):
        load(jdir)
    (jdir / HEAD_NAME).write_bytes(head)
    (jdir / JOURNAL_NAME).unlink()
    with pytest.raises(JournalError, match="missing"):
        load(jdir)


def test_an_unknown_version_is_refused_by_name(jdir: Path) -> None:
    write(jdir).close()
    data = bytearray((jdir / JOURNAL_NAME).read_bytes())
    data[8:10] = (7).to_bytes(2, "big")
    (jdir / JOURNAL_NAME).write_bytes(bytes(data))
    with pytest.raises(JournalError, match="format version 7"):
        load(jdir)


def test_rollback_to_an_older_complete_copy_is_not_detectable(jdir: Path,
                                                             tmp_path: Path) -> None:
    """Honest limit (PROTOCOL.md 17.3): an adversary who can write the service's files
    and keeps an older copy of both the journal and its head can put them back; nothing
    in software tells them from the newer ones (a TEE monotonic counter would)."""
    j = write(jdir, 2)
    saved = tmp_path / "saved"
    shutil.copytree(jdir, saved)
    for i in range(5):
        j.append(["end", i])
    j.commit()
    j.close()
    for name in (JOURNAL_NAME, HEAD_NAME):
        shutil.copy(saved / name, jdir / name)
    got = load(jdir)
    assert got is not None and len(got.records) == 2  # the older state, accepted


def test_a_compaction_interrupted_after_the_head_is_completed(jdir: Path) -> None:
    j = write(jdir, 2)
    # simulate a crash between the head update and the rename: do the steps by hand
    os.rename(jdir / JOURNAL_NAME, jdir / "old")
    j.start({"format": 1, "table": {"n": 3}})
    j.close()
    os.rename(jdir / JOURNAL_NAME, jdir / NEW_NAME)
    os.rename(jdir / "old", jdir / JOURNAL_NAME)
    got = load(jdir)
    assert got is not None and got.snapshot["table"] == {"n": 3}
    assert not (jdir / NEW_NAME).exists()


def test_a_compaction_the_directory_refuses_keeps_the_journal_whole(jdir: Path) -> None:
    j = write(jdir, 2)
    (jdir / NEW_NAME).mkdir()  # a real obstacle: the temporary name is taken by a directory
    assert not j.compact({"format": 1, "table": {"n": 9}})
    assert j.compaction_error is not None
    j.append(["end", 1])
    j.commit()
    j.close()
    (jdir / NEW_NAME).rmdir()
    got = load(jdir)
    assert got is not None and got.snapshot == SNAP  # the old file, still whole
    assert got.records[-1][1] == ["end", 1] and len(got.records) == 3


# ------------------------------------------------------------------ version 2: the head


def slots(d: Path) -> tuple[bytes, bytes]:
    raw = (d / HEAD_NAME).read_bytes()
    assert len(raw) == jr.HEAD_BYTES
    return raw[: jr.HEAD_SLOT], raw[jr.HEAD_SLOT :]


def put_slot(d: Path, seq: int, value: bytes) -> None:
    raw = bytearray((d / HEAD_NAME).read_bytes())
    at = (seq % 2) * jr.HEAD_SLOT
    raw[at : at + jr.HEAD_SLOT] = value
    (d / HEAD_NAME).write_bytes(bytes(raw))


def test_each_commit_stores_the_slot_of_its_seq_and_leaves_the_other(jdir: Path) -> None:
    j = write(jdir, 3)  # seqs 1 (snapshot) .. 4
    before = slots(jdir)
    j.append(change(7))
    j.commit()  # seq 5: slot 1 changes, slot 0 (seq 4) stays
    after = slots(jdir)
    assert after[0] == before[0] and after[1] != before[1]
    j.close()
    seqs = [int.from_bytes(s[26:34], "big") for s in after]
    assert seqs == [4, 5]


def test_a_torn_store_of_the_newest_slot_is_tolerated_wherever_it_tears(jdir: Path) -> None:
    """A SIGKILL in the middle of the copy into the mapping leaves the slot part new,
    part old: the journal still loads, whole (its last record was written first)."""
    j = write(jdir, 4)  # last seq 5, in slot 1; slot 0 holds 4
    old = slots(jdir)[0]
    j.append(change(9))
    j.commit()  # seq 6 into slot 0
    j.close()
    new = slots(jdir)[0]
    for cut in range(1, jr.HEAD_SLOT):
        torn = new[:cut] + old[cut:]
        if torn == new:
            continue
        put_slot(jdir, 6, torn)
        got = load(jdir)
        assert got is not None and got.last_seq == 6, cut
        assert [r for _, r in got.records] == [change(i) for i in range(4)] + [change(9)]


def test_a_garbled_newest_slot_does_not_let_the_last_record_be_cut(jdir: Path) -> None:
    write(jdir, 4).close()  # last seq 5 in slot 1
    start, _ = offsets(jdir)[-1]
    data = (jdir / JOURNAL_NAME).read_bytes()
    put_slot(jdir, 5, bytes(jr.HEAD_SLOT))
    assert load(jdir) is not None  # garbled only: nothing is lost, the journal loads whole
    (jdir / JOURNAL_NAME).write_bytes(data[:start])  # and record 5 cut: refused
    with pytest.raises(JournalError, match=r"one slot does not verify.*ends at seq 4, not at 5"):
        load(jdir)


def test_a_garbled_older_slot_is_refused(jdir: Path) -> None:
    write(jdir, 4).close()  # slot 0 holds seq 4, slot 1 seq 5
    put_slot(jdir, 4, os.urandom(jr.HEAD_SLOT))
    with pytest.raises(JournalError, match="one slot does not verify"):
        load(jdir)


def test_swapped_slots_are_refused(jdir: Path) -> None:
    write(jdir, 4).close()
    a, b = slots(jdir)
    (jdir / HEAD_NAME).write_bytes(b + a)  # each MAC'd, but its seq names the other slot
    with pytest.raises(JournalError, match="does not verify"):
        load(jdir)


def test_slots_of_two_journals_are_refused(jdir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    write(jdir, 4).close()
    write(other, 4).close()  # same key, same seqs, another file id
    put_slot(jdir, 4, slots(other)[0])
    with pytest.raises(JournalError, match="do not name consecutive records of one journal"):
        load(jdir)


def test_a_head_of_another_size_is_refused(jdir: Path) -> None:
    write(jdir, 2).close()
    (jdir / HEAD_NAME).write_bytes((jdir / HEAD_NAME).read_bytes() + b"\0")
    with pytest.raises(JournalError, match="has 133 bytes, not 132"):
        load(jdir)


def test_a_new_file_names_its_first_record_and_the_genesis_before_it(jdir: Path) -> None:
    """Right after a start the other slot names first - 1 (the genesis tag): a torn
    store of the first commit's slot is tolerated like any other."""
    j = write(jdir, 0)  # the snapshot only, seq 1; slot 0 names seq 0
    assert load(jdir) is not None
    old = slots(jdir)[0]
    j.append(change(1))
    j.commit()  # seq 2 into slot 0
    j.close()
    put_slot(jdir, 2, slots(jdir)[0][:40] + old[40:])
    got = load(jdir)
    assert got is not None and got.records == [(2, change(1))]


def test_fsync_writes_the_same_journal(jdir: Path) -> None:
    j = Journal(_fd(jdir), KEY, fsync=True)
    j.start(SNAP)
    for i in range(3):
        j.append(change(i))
        j.commit()
    j.close()
    got = load(jdir)
    assert got is not None and [r for _, r in got.records] == [change(i) for i in range(3)]


# ------------------------------------------------------------------ version 1


V1 = Path(__file__).parent / "data" / "journal-v1"


def test_the_version_1_fixture_loads_with_bytes_fields() -> None:
    key = (V1 / "service.key").read_bytes()
    fd = os.open(V1, os.O_PATH | os.O_DIRECTORY)
    try:
        got = jr.load(fd, key)
    finally:
        os.close(fd)
    assert got is not None and got.version == 1 and got.records
    kinds = {r[0] for _, r in got.records}
    assert "start" in kinds and "req" in kinds
    for _, r in got.records:
        if r[0] == "req":
            assert isinstance(r[2], bytes) and (r[3] is None or isinstance(r[3], bytes))
            assert all(isinstance(t, bytes) for t in r[6])
        elif r[0] == "start":
            assert isinstance(r[5], bytes) and isinstance(r[6], bytes)


# ------------------------------------------------------------------ parsers, property-tested


sid_s = st.integers(0, 2**64 - 1)
clock_s = st.floats(allow_nan=False, allow_infinity=False)
blob_s = st.binary(max_size=64)
change_s = st.one_of(
    st.builds(lambda sid, p, b, now, wall, toks, run: ["req", sid, p, b, now, wall, toks, run],
              sid_s, blob_s, st.none() | blob_s, clock_s, clock_s,
              st.lists(st.binary(min_size=16, max_size=16), max_size=3),
              st.none() | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)),
    st.builds(lambda sid, u, g, p, h, v: ["start", sid, u, g, p, h, v], sid_s,
              st.integers(-(2**31), 2**32), st.integers(-(2**31), 2**32),
              st.integers(-(2**31), 2**31), blob_s, blob_s),
    st.builds(lambda t: ["expire", t], clock_s),
    st.builds(lambda s: ["detach", s], sid_s),
    st.builds(lambda s: ["end", s], sid_s),
    st.builds(lambda s, f, v: ["resume", s, f, v], sid_s, sid_s, blob_s),
)


@given(st.lists(change_s, min_size=1, max_size=8))
def test_changes_round_trip(changes: list[list[object]]) -> None:
    payload = b"".join(jr.encode_change(c) for c in changes)
    assert jr.decode_changes(payload, 7) == changes


@given(st.lists(change_s, min_size=1, max_size=6), st.data())
def test_a_truncated_commit_is_a_journal_error_or_a_prefix(changes: list[list[object]],
                                                            data: st.DataObject) -> None:
    parts = [jr.encode_change(c) for c in changes]
    payload = b"".join(parts)
    cut = data.draw(st.integers(0, len(payload) - 1))
    try:
        got = jr.decode_changes(payload[:cut], 7)
    except JournalError as exc:
        assert "record seq 7" in str(exc)
        return
    # it parsed: the cut fell between two changes
    assert got == changes[: len(got)] and len(b"".join(parts[: len(got)])) == cut


@given(st.lists(change_s, min_size=1, max_size=6), st.data())
def test_a_mutated_commit_raises_nothing_but_journal_error(changes: list[list[object]],
                                                           data: st.DataObject) -> None:
    payload = bytearray(b"".join(jr.encode_change(c) for c in changes))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        payload += data.draw(st.binary(max_size=20))
    with contextlib.suppress(JournalError):
        jr.decode_changes(bytes(payload), 7)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_journal_error(payload: bytes) -> None:
    with contextlib.suppress(JournalError):
        jr.decode_changes(payload, 3)


def _nested(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(inner, max_size=8)


json_s = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                      _nested, max_leaves=20)


@given(st.one_of(json_s, st.tuples(st.sampled_from(["req", "start", "resume", "end"]),
                                   st.lists(json_s, max_size=8)).map(lambda t: [t[0], *t[1]])))
def test_a_version_1_change_converts_or_raises_journal_error(change: object) -> None:
    with contextlib.suppress(JournalError):
        jr._from_v1(change, 4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_damaged_journal_or_head_never_raises_anything_but_journal_error(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    d = tmp_path_factory.mktemp("prop")
    write(d, 4).close()
    name = data.draw(st.sampled_from([JOURNAL_NAME, HEAD_NAME]))
    raw = bytearray((d / name).read_bytes())
    how = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if how == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=40))
    (d / name).write_bytes(bytes(raw))
    try:
        got = load(d)
    except JournalError:
        return
    # what still loads lost nothing committed, except by a cut inside the torn zone
    assert got is not None and [r for _, r in got.records] == [change(i) for i in range(4)]


@pytest.mark.parametrize("before", [4090, 2**34 - 6])
def test_commit_tokens_verify_across_a_chunk_and_a_counter_boundary(jdir: Path,
                                                                    before: int) -> None:
    """The writer draws tokens 4096 at a time; the loader computes one: they agree on
    both sides of a chunk (seq 4096) and of the cipher's 32-bit block counter (seq
    2**34, where the block number moves into the nonce)."""
    j = Journal(_fd(jdir), KEY)
    j.resume_at(before)
    j.start(SNAP)
    for i in range(10):
        j.append(change(i))
        j.commit()
        got = load(jdir)
        assert got is not None and got.last_seq == before + 2 + i
    j.close()
    # and each token is its seq's only: a slot moved on to a later seq does not verify
    base = jr._base_key(KEY)
    newest = slots(jdir)[1]
    assert jr._slot(newest, base, 1) is not None
    for later in (2, 4, 4096):
        seq = int.from_bytes(newest[26:34], "big") + later
        assert jr._slot(newest[:26] + seq.to_bytes(8, "big") + newest[34:], base, 1) is None
