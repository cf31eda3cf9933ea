"""The service's journal: every acknowledged change, authenticated, so a restarted service
restores every semaphore and session exactly (PROTOCOL.md section 17).

Format, version 1 (``JOURNAL_VERSION``). A journal file starts with a header::

    magic "ESEMJRNL" (8) | version u16 | flags u16 (0) | file id (16 random bytes) | first seq u64

then records, each::

    version u8 | seq u64 | length u32 | ChaCha20-Poly1305 ciphertext of length - 16 bytes | tag (16)

The record key is derived from the service's static private key and the file id
(keyed BLAKE2s with its own personalisation, so it never equals a key used anywhere
else), the nonce is the record's seq, and the associated data is the record's own header
and the previous record's tag (for the first record, a tag derived from the file header):
so each tag is a MAC chained over the previous one, and an edited, reordered, spliced
(even from another journal of the same service) or removed record fails to verify. The
payloads are encrypted too, because they hold semaphore keys. The first record of a file
is a snapshot of the whole state; each later record is one commit: the JSON list of the
changes made since the previous one (group commit: one seal and one write per commit).

A small head file beside it (``esem.journal.head``, rewritten in place after every
commit, MAC'd) names the file id, the last committed seq and its tag, so cutting whole
records off the end of the journal is detected too. What the head cannot detect is a
rollback of both files to an older complete copy: that needs a monotonic counter the
adversary cannot reset (a TPM or TEE), which software alone does not have.

Damage tolerated: only a torn last record (a crash in the middle of a write), beyond the
head's seq, as the very last bytes of the file. Anything else is a ``JournalError`` and
the service refuses to start.

Compaction: a new file (new file id, seqs going on) holding one snapshot record is
written and synced, the head is pointed at it, and it is renamed over the old file; a
crash at any point leaves either the old file and head, or the new ones (the rename is
completed at the next start). Every start compacts, so a file is never appended to by two
service runs (and a nonce is never used twice under one file key).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from esem.errors import EsemError

JOURNAL_VERSION = 1  # what this service writes; _READERS lists what it reads
JOURNAL_NAME = "esem.journal"
HEAD_NAME = "esem.journal.head"
NEW_NAME = "esem.journal.new"  # a compaction in progress
MAGIC = b"ESEMJRNL"
HEAD_MAGIC = b"ESEMHEAD"
TAG_BYTES = 16
MAC_BYTES = 32
MAX_RECORD = 1 << 30  # bytes of one record's ciphertext (a snapshot of a huge table)
# Compact once the tail has this many records and is larger than the last snapshot.
COMPACT_RECORDS = 100_000

_HEADER = struct.Struct(">8sHH16sQ")  # magic, version, flags, file id, first seq
_REC = struct.Struct(">BQI")  # version, seq, length
_HEAD = struct.Struct(">8sH16sQ16s")  # magic, version, file id, seq, tag; then its MAC
_NONCE = struct.Struct("<4xQ")
_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class JournalError(EsemError):
    """The journal does not verify (or cannot be read); the message says why."""


def _base_key(static_private: bytes) -> bytes:
    return hashlib.blake2s(b"journal", key=static_private, person=b"esemjrnl").digest()


def _file_key(base: bytes, file_id: bytes) -> bytes:
    return hashlib.blake2s(file_id, key=base, person=b"jrnlfile").digest()


def _head_key(base: bytes) -> bytes:
    return hashlib.blake2s(b"head", key=base, person=b"jrnlhead").digest()


def _genesis(key: bytes, header: bytes) -> bytes:
    """The 'previous tag' of a file's first record: a MAC of the file header."""
    return hashlib.blake2s(header, key=key, person=b"jrnlhdr0").digest()[:TAG_BYTES]


@dataclass(frozen=True)
class Head:
    file_id: bytes
    seq: int
    tag: bytes


@dataclass
class Loaded:
    """A verified journal: the snapshot it starts from and the changes after it."""

    version: int
    file_id: bytes
    snapshot: dict[str, Any]
    # (seq of the record holding it, change), in the order they were made
    records: list[tuple[int, list[Any]]] = field(default_factory=list)
    last_seq: int = 0
    torn: int = 0  # bytes of a torn last record that were ignored


# ------------------------------------------------------------------ reading


def _read_all(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | _FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"cannot read {name}: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not (st.st_mode & 0o170000 == 0o100000):
            raise JournalError(f"{name} is not a regular file")
        if st.st_uid != os.geteuid():
            raise JournalError(f"{name} belongs to uid {st.st_uid}, not to this service")
        return f.read()


def _parse_head(raw: bytes, base: bytes) -> Head:
    if len(raw) != _HEAD.size + MAC_BYTES:
        raise JournalError(f"{HEAD_NAME} has {len(raw)} bytes, not {_HEAD.size + MAC_BYTES}")
    body, mac = raw[: _HEAD.size], raw[_HEAD.size :]
    expected = hashlib.blake2s(body, key=_head_key(base)).digest()
    if not hmac.compare_digest(expected, mac):
        raise JournalError(f"{HEAD_NAME} does not verify (edited, or another service's)")
    magic, version, file_id, seq, tag = _HEAD.unpack(body)
    if magic != HEAD_MAGIC or version not in _READERS:
        raise JournalError(f"{HEAD_NAME}: unknown format")
    return Head(file_id, seq, tag)


def _file_header(data: bytes) -> tuple[int, bytes, int]:
    if len(data) < _HEADER.size:
        raise JournalError(f"{JOURNAL_NAME} is truncated inside its header")
    magic, version, flags, file_id, first_seq = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise JournalError(f"{JOURNAL_NAME} is not an esem journal")
    if version not in _READERS:
        raise JournalError(f"{JOURNAL_NAME} has format version {version}; this service "
                           f"reads versions {sorted(_READERS)}")
    if flags:
        raise JournalError(f"{JOURNAL_NAME}: unknown flags {flags:#x}")
    return version, file_id, first_seq


def _records_v1(data: bytes, base: bytes, head: Head) -> Loaded:
    """Verify a version-1 file against its head; the records it holds."""
    version, file_id, first_seq = _file_header(data)
    aead = ChaCha20Poly1305(_file_key(base, file_id))
    prev = _genesis(_file_key(base, file_id), data[: _HEADER.size])
    pos, seq = _HEADER.size, first_seq
    tags: dict[int, bytes] = {}
    payloads: list[tuple[int, bytes]] = []
    torn = 0
    while pos < len(data):
        if len(data) - pos < _REC.size:
            torn = len(data) - pos
            break
        rec_version, rec_seq, length = _REC.unpack_from(data, pos)
        if rec_version != version or rec_seq != seq:
            raise JournalError(f"record at byte {pos} claims version {rec_version} seq "
                               f"{rec_seq}, expected seq {seq}: reordered or spliced")
        if not TAG_BYTES <= length <= MAX_RECORD:
            raise JournalError(f"record seq {seq} has an impossible length {length}")
        start = pos + _REC.size
        if len(data) - start < length:
            torn = len(data) - pos
            break
        header = data[pos:start]
        try:
            plain = aead.decrypt(_NONCE.pack(seq), data[start : start + length], header + prev)
        except InvalidTag:
            raise JournalError(f"record seq {seq} does not verify: the journal was edited, "
                               "reordered, cut in the middle, or spliced") from None
        prev = data[start + length - TAG_BYTES : start + length]
        tags[seq] = prev
        payloads.append((seq, plain))
        pos = start + length
        seq += 1
    if not payloads:
        raise JournalError(f"{JOURNAL_NAME} holds no snapshot")
    last = payloads[-1][0]
    if head.file_id != file_id:
        raise JournalError(f"{JOURNAL_NAME} and {HEAD_NAME} belong to different journals")
    if head.seq > last:
        raise JournalError(f"{JOURNAL_NAME} ends at seq {last} but its head says {head.seq} "
                           "was committed: records were cut off its end")
    if tags.get(head.seq) != head.tag:
        raise JournalError(f"record seq {head.seq} is not the one {HEAD_NAME} committed")
    records: list[tuple[int, list[Any]]] = []
    try:
        snapshot = json.loads(payloads[0][1])
        for s, p in payloads[1:]:
            group = json.loads(p)
            if not isinstance(group, list) or not all(isinstance(c, list) for c in group):
                raise JournalError(f"record seq {s} is not a list of changes")
            records += [(s, change) for change in group]
    except ValueError as exc:
        raise JournalError(f"a record does not parse: {exc}") from None
    if not isinstance(snapshot, dict):
        raise JournalError("the first record is not a snapshot")
    return Loaded(version, file_id, snapshot, records, last, torn)


# Every format version this service reads; a newer service keeps the older readers.
_READERS = {1: _records_v1}


def load(dir_fd: int, static_private: bytes) -> Loaded | None:
    """Read and verify the journal in the directory ``dir_fd``; None if there is none
    (a first start). Raises ``JournalError`` saying why it does not verify."""
    base = _base_key(static_private)
    data = _read_all(dir_fd, JOURNAL_NAME)
    head_raw = _read_all(dir_fd, HEAD_NAME)
    new = _read_all(dir_fd, NEW_NAME)
    if head_raw is None:
        if data is not None:
            raise JournalError(f"{HEAD_NAME} is missing beside {JOURNAL_NAME}")
        if new is not None:  # the very first compaction did not finish: nothing committed
            os.unlink(NEW_NAME, dir_fd=dir_fd)
        return None
    head = _parse_head(head_raw, base)
    if new is not None:
        if len(new) >= _HEADER.size and _file_header(new)[1] == head.file_id:
            # the head already names the new file: finish the compaction's rename
            os.rename(NEW_NAME, JOURNAL_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            data = new
        else:
            os.unlink(NEW_NAME, dir_fd=dir_fd)
    if data is None:
        raise JournalError(f"{JOURNAL_NAME} is missing but {HEAD_NAME} says seq {head.seq} "
                           "was committed")
    version = _file_header(data)[0]
    return _READERS[version](data, base, head)


# ------------------------------------------------------------------ writing


class Journal:
    """Appends records to the journal in one directory; ``commit`` writes them (one
    write per commit: group commit), syncs them with ``fsync``, then updates the head.
    Only the service's event-loop thread uses it."""

    def __init__(self, dir_fd: int, static_private: bytes, *, fsync: bool = False) -> None:
        self._dir_fd = dir_fd
        self._base = _base_key(static_private)
        self._head_key = _head_key(self._base)
        self.fsync = fsync
        self._fd = -1
        self._head_fd = -1
        self._aead: ChaCha20Poly1305 | None = None
        self._file_id = b""
        self._prev = b""
        self._seq = 0  # the last seq written
        self._pending: list[list[Any]] = []  # changes appended since the last commit
        self.tail_records = 0  # records since the snapshot
        self.tail_bytes = 0
        self.snapshot_bytes = 0
        self.commits = 0
        self.records = 0
        self.compaction_error: str | None = None

    @property
    def seq(self) -> int:
        return self._seq

    def _encode(self, payload: bytes) -> bytes:
        assert self._aead is not None
        self._seq += 1
        seq = self._seq
        header = _REC.pack(JOURNAL_VERSION, seq, len(payload) + TAG_BYTES)
        sealed = self._aead.encrypt(_NONCE.pack(seq), payload, header + self._prev)
        self._prev = sealed[-TAG_BYTES:]
        return header + sealed

    def append(self, change: list[Any]) -> None:
        """Record one change; it is written by the next ``commit``."""
        self._pending.append(change)
        self.tail_records += 1
        self.records += 1

    def commit(self) -> None:
        """Write the changes appended since the last commit as one record (group
        commit: one seal, one write), with ``fsync`` sync it, then update the head.
        Called before any reply is written, so a reply never precedes its changes."""
        if not self._pending:
            return
        payload = json.dumps(self._pending, separators=(",", ":")).encode()
        self._pending = []
        data = memoryview(self._encode(payload))
        self.tail_bytes += len(data)
        while data:
            n = os.write(self._fd, data)
            data = data[n:]
        if self.fsync:
            os.fdatasync(self._fd)
        self._write_head()
        self.commits += 1

    def _write_head(self) -> None:
        body = _HEAD.pack(HEAD_MAGIC, JOURNAL_VERSION, self._file_id, self._seq, self._prev)
        raw = body + hashlib.blake2s(body, key=self._head_key).digest()
        if self._head_fd < 0:
            self._head_fd = os.open(HEAD_NAME, os.O_RDWR | os.O_CREAT | _FLAGS, 0o600,
                                    dir_fd=self._dir_fd)
            os.fchmod(self._head_fd, 0o600)
        os.pwrite(self._head_fd, raw, 0)  # one write of 82 bytes: whole or not at all
        if self.fsync:
            os.fdatasync(self._head_fd)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def wants_compaction(self) -> bool:
        return self.tail_records >= COMPACT_RECORDS and self.tail_bytes > self.snapshot_bytes

    def compact(self, snapshot: dict[str, Any]) -> bool:
        """``start`` a new file from ``snapshot``; if the directory refuses (full, or no
        longer writable after ``--user``), keep appending to the current file and say
        so: the journal stays whole, only larger. True if it compacted."""
        saved = (self._aead, self._prev, self._file_id, self._seq)
        try:
            self.start(snapshot)
        except OSError as exc:
            self._aead, self._prev, self._file_id, self._seq = saved
            with contextlib.suppress(OSError):
                os.unlink(NEW_NAME, dir_fd=self._dir_fd)
            self.tail_records = 0  # try again after as many records
            self.compaction_error = str(exc)
            return False
        return True

    def start(self, snapshot: dict[str, Any]) -> None:
        """Begin a new file holding ``snapshot`` (at start-up, and to compact): written
        and synced under a temporary name, the head pointed at it, renamed into place."""
        self.commit()
        file_id = os.urandom(16)
        first = self._seq + 1
        header = _HEADER.pack(MAGIC, JOURNAL_VERSION, 0, file_id, first)
        key = _file_key(self._base, file_id)
        self._aead = ChaCha20Poly1305(key)
        self._prev = _genesis(key, header)
        self._file_id = file_id
        with contextlib.suppress(FileNotFoundError):
            os.unlink(NEW_NAME, dir_fd=self._dir_fd)
        fd = os.open(NEW_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _FLAGS,
                     0o600, dir_fd=self._dir_fd)
        try:
            os.fchmod(fd, 0o600)
            data = header + self._encode(json.dumps(snapshot, separators=(",", ":")).encode())
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)  # always: a compaction is rare, and the old file goes
            self._write_head()
            if not self.fsync:
                os.fsync(self._head_fd)
            os.rename(NEW_NAME, JOURNAL_NAME, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self._sync_dir()
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self.snapshot_bytes = len(data)
        self.tail_records = self.tail_bytes = 0

    def _sync_dir(self) -> None:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._dir_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def resume_at(self, seq: int) -> None:
        """Go on numbering after ``seq`` (the last seq of the journal just restored)."""
        self._seq = seq

    def close(self) -> None:
        """Commit what is left and close the files (and the directory descriptor, which
        the journal owns)."""
        if self._dir_fd < 0:
            return
        if self._aead is not None:
            self.commit()
        for fd in (self._fd, self._head_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._head_fd = self._dir_fd = -1
