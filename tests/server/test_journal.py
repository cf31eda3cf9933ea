"""The journal's format and its verification (esem.server.journal; PROTOCOL.md 17): what
it writes reads back; every kind of tampering is a JournalError saying what it found,
except a rollback of both files to an older complete copy, which software cannot see."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

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
                                               grouped[:-1] + [grouped[1], grouped[-1]]]
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
