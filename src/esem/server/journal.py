"""The service's journal: every acknowledged change, authenticated, so a restarted service
restores every semaphore and session exactly (PROTOCOL.md section 17).

Format, version 2 (``JOURNAL_VERSION``; version 1 is still read, and rewritten as version 2
by the compaction every start makes). A journal file starts with a header::

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
is a snapshot of the whole state (JSON: rare); each later record is one commit: the
changes made since the previous one, each in a compact binary encoding (``_REQ`` and
friends below; version 1 used JSON with hex, which cost more than the request itself).
A commit is one seal and one ``write``.

The head (``esem.journal.head``) names the file id, the last committed seq and its tag,
with proof that the service wrote it, so cutting whole records off the end of the
journal is detected too. Version 1 rewrote it with one ``pwrite`` per commit, proved by
a BLAKE2s MAC. Version 2 makes a commit's head update cost no system call and no hash:

* the proof is the seq's *commit token*: 16 bytes of a ChaCha20 keystream under a key
  derived from the service key and the file id, at the seq's position. Only the key
  holder can tell the token of a seq no head has held yet, and the writer draws them
  4096 at a time (one cipher call), so a commit only slices 16 bytes.
* the head has two slots, the slot of seq s being ``s % 2``, and a commit stores its
  slot through a shared memory mapping of the head file: no system call per commit, the
  same bytes in the page cache a ``pwrite`` would leave (with ``--fsync`` an ``msync``
  follows, as the ``fdatasync`` did).

A store into a mapping, unlike a small ``pwrite``, can be torn by a crash (a SIGKILL
between two instructions of the copy). Two slots make that harmless without giving up
the cut check:

* a commit of seq s writes record s, then overwrites slot ``s % 2`` (which held s - 2);
  slot ``(s - 1) % 2`` still holds s - 1, whole. A torn store therefore leaves one slot
  valid at seq s - 1 and record s complete in the file, with nothing after it.
* so the loader takes the valid slot with the higher seq when both verify (the journal
  must reach it); when only one verifies, it accepts only a journal that ends exactly
  one record beyond it (what a torn store leaves). An adversary who garbles the newest
  slot cannot cut anything: the journal must then still hold the record after the
  older slot, which is the newest one. A slot cannot be moved to the other position
  (its seq's parity names its position, under the MAC), and putting back an older copy
  of a slot is a rollback, the documented limit below (a slot of an older seq is what
  an older copy of a version-1 head was: known to whoever kept one).

The head is written with one ``pwrite`` of both slots (and synced) only when a file is
started: at every start and at compaction. What the head cannot detect is a rollback of
both files to an older complete copy: that needs a monotonic counter the adversary
cannot reset (a TPM or TEE), which software alone does not have.

Damage tolerated: only a torn last record (a crash in the middle of a write), beyond the
head's seq, as the very last bytes of the file, and a torn head slot as above. Anything
else is a ``JournalError`` and the service refuses to start.

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
import math
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from esem.errors import EsemError

JOURNAL_VERSION = 2  # what this service writes; _READERS lists what it reads
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
_HEAD = struct.Struct(">8sH16sQ16s")  # version 1: magic, version, file id, seq, tag; MAC
HEAD_V1 = _HEAD.size + MAC_BYTES  # 82
# Version 2, per slot: magic, version, file id, seq, tag, the seq's commit token
_SLOT = struct.Struct(">8sH16sQ16s16s")
HEAD_SLOT = _SLOT.size  # 66
HEAD_BYTES = 2 * HEAD_SLOT  # the version-2 head: slot 0 (even seqs), slot 1 (odd seqs)
TOKEN = 16
_TOKENS_PER_CHUNK = 4096  # commit tokens drawn from the keystream at a time (64 KiB)
_NONCE = struct.Struct("<4xQ")
_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC

# Version-2 changes, concatenated in a commit's payload; each starts with its kind byte.
# NONE marks an absent reply body (a wait that queued) or an absent pid list.
K_REQ, K_START, K_EXPIRE, K_DETACH, K_END, K_RESUME = 1, 2, 3, 4, 5, 6
NONE = 0xFFFFFFFF
# kind, sid, plaintext bytes, body bytes or NONE, loop time, wall time, tokens, pids or
# NONE; then the plaintext, the body, each token (u16 length, bytes), each pid (i64)
_REQ = struct.Struct(">BQIIddHI")
_START = struct.Struct(">BQqqqHH")  # kind, sid, uid, gid, pid, binding bytes, verifier bytes
_EXPIRE = struct.Struct(">Bd")  # kind, loop time
_SID = struct.Struct(">BQ")  # detach, end: kind, sid
_RESUME = struct.Struct(">BQQH")  # kind, sid, the fresh session, verifier bytes
_U16 = struct.Struct(">H")
_PID = struct.Struct(">q")


class JournalError(EsemError):
    """The journal does not verify (or cannot be read); the message says why."""


def _base_key(static_private: bytes) -> bytes:
    return hashlib.blake2s(b"journal", key=static_private, person=b"esemjrnl").digest()


def _file_key(base: bytes, file_id: bytes) -> bytes:
    return hashlib.blake2s(file_id, key=base, person=b"jrnlfile").digest()


def _head_key(base: bytes) -> bytes:
    return hashlib.blake2s(b"head", key=base, person=b"jrnlhead").digest()


def _token_key(base: bytes, file_id: bytes) -> bytes:
    return hashlib.blake2s(file_id, key=base, person=b"jrnltokn").digest()


def _tokens(key: bytes, first: int, count: int) -> bytes:
    """The commit tokens of seqs ``first`` .. ``first + count - 1`` (``first`` a multiple
    of 4): 16 bytes each of the ChaCha20 keystream under the file's token key, seq s at
    byte 16 s. ChaCha20 is a PRF of its block counter, so a token is unpredictable
    without the key however many others are known. Block b = s // 4 is counter
    b mod 2**32, nonce b // 2**32 (a chunk never crosses such a boundary)."""
    block = first // 4
    nonce = (block & 0xFFFFFFFF).to_bytes(4, "little") + (block >> 32).to_bytes(12, "little")
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return enc.update(bytes(count * TOKEN))


def commit_token(base: bytes, file_id: bytes, seq: int) -> bytes:
    """The token a version-2 head slot naming ``seq`` of the file ``file_id`` holds."""
    first = seq - seq % 4
    at = (seq - first) * TOKEN
    return _tokens(_token_key(base, file_id), first, 4)[at : at + TOKEN]


def _genesis(key: bytes, header: bytes) -> bytes:
    """The 'previous tag' of a file's first record: a MAC of the file header."""
    return hashlib.blake2s(header, key=key, person=b"jrnlhdr0").digest()[:TAG_BYTES]


@dataclass(frozen=True)
class Head:
    file_id: bytes
    seq: int
    tag: bytes
    # Version 2: the other slot did not verify, as a store torn by a crash leaves it;
    # then the journal must end exactly one record after ``seq``.
    torn: bool = False


@dataclass
class Loaded:
    """A verified journal: the snapshot it starts from and the changes after it, each
    a list naming its kind first, byte fields as bytes (whatever the version)."""

    version: int
    file_id: bytes
    snapshot: dict[str, Any]
    # (seq of the record holding it, change), in the order they were made
    records: list[tuple[int, list[Any]]] = field(default_factory=list)
    last_seq: int = 0
    torn: int = 0  # bytes of a torn last record that were ignored


# ------------------------------------------------------------------ changes


def encode_change(change: Sequence[Any]) -> bytes:
    """One change in the version-2 encoding (``Journal.append_req`` writes ``req``
    straight into its buffer)."""
    kind = change[0]
    if kind == "req":
        _, sid, plaintext, body, now, wall, tokens, running = change
        out = bytearray()
        _encode_req(out, sid, plaintext, body, now, wall, tokens, running)
        return bytes(out)
    if kind == "start":
        _, sid, uid, gid, pid, binding, verifier = change
        fixed = _START.pack(K_START, sid, uid, gid, pid, len(binding), len(verifier))
        return fixed + bytes(binding) + bytes(verifier)
    if kind == "expire":
        return _EXPIRE.pack(K_EXPIRE, change[1])
    if kind in ("detach", "end"):
        return _SID.pack(K_DETACH if kind == "detach" else K_END, change[1])
    if kind == "resume":
        _, sid, fresh, verifier = change
        return _RESUME.pack(K_RESUME, sid, fresh, len(verifier)) + bytes(verifier)
    raise ValueError(f"not a journal change: {kind!r}")


def _encode_req(out: bytearray, sid: int, plaintext: bytes, body: bytes | None, now: float,
                wall: float, tokens: Sequence[bytes], running: Sequence[int] | None) -> None:
    """Append one ``req`` change to ``out`` (a commit's buffer, on the hot path)."""
    out += _REQ.pack(K_REQ, sid, len(plaintext), NONE if body is None else len(body),
                     now, wall, len(tokens), NONE if running is None else len(running))
    out += plaintext
    if body is not None:
        out += body
    for t in tokens:
        out += _U16.pack(len(t))
        out += t
    for pid in running or ():
        out += _PID.pack(pid)


class _Reader:
    """Bounds-checked reads from one payload: anything short is a JournalError."""

    def __init__(self, data: bytes, seq: int) -> None:
        self.data = data
        self.pos = 0
        self.seq = seq

    def fail(self, why: str) -> JournalError:
        return JournalError(f"record seq {self.seq} does not parse at byte {self.pos}: {why}")

    def fixed(self, st: struct.Struct) -> tuple[Any, ...]:
        if len(self.data) - self.pos < st.size:
            raise self.fail("truncated")
        out = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return out

    def take(self, n: int) -> bytes:
        if len(self.data) - self.pos < n:
            raise self.fail(f"{n} bytes announced, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def clock(self, value: float) -> float:
        if not math.isfinite(value):
            raise self.fail(f"a clock reads {value}")
        return value


def decode_changes(payload: bytes, seq: int) -> list[list[Any]]:
    """The changes of one version-2 commit record; a JournalError if it does not parse
    (never anything else, whatever the bytes)."""
    r = _Reader(payload, seq)
    out: list[list[Any]] = []
    while r.pos < len(payload):
        kind = payload[r.pos]
        if kind == K_REQ:
            _, sid, lp, lb, now, wall, nt, nr = r.fixed(_REQ)
            plaintext = r.take(lp)
            body = None if lb == NONE else r.take(lb)
            tokens = [r.take(r.fixed(_U16)[0]) for _ in range(nt)]
            running = None if nr == NONE else [r.fixed(_PID)[0] for _ in range(nr)]
            out.append(["req", sid, plaintext, body, r.clock(now), r.clock(wall), tokens,
                        running])
        elif kind == K_START:
            _, sid, uid, gid, pid, lb, lv = r.fixed(_START)
            out.append(["start", sid, uid, gid, pid, r.take(lb), r.take(lv)])
        elif kind == K_EXPIRE:
            out.append(["expire", r.clock(r.fixed(_EXPIRE)[1])])
        elif kind in (K_DETACH, K_END):
            out.append(["detach" if kind == K_DETACH else "end", r.fixed(_SID)[1]])
        elif kind == K_RESUME:
            _, sid, fresh, lv = r.fixed(_RESUME)
            out.append(["resume", sid, fresh, r.take(lv)])
        else:
            raise r.fail(f"unknown change kind {kind}")
    if not out:
        raise r.fail("a commit of no change")
    return out


def _from_v1(change: Any, seq: int) -> list[Any]:
    """A version-1 change (JSON, bytes in hex) in the form every version loads to."""
    try:
        if not isinstance(change, list) or not change or not isinstance(change[0], str):
            raise ValueError("not a change")
        kind = change[0]
        if kind == "req":
            _, sid, plaintext, body, now, wall, tokens, running = change
            return ["req", sid, bytes.fromhex(plaintext),
                    None if body is None else bytes.fromhex(body), now, wall,
                    [bytes.fromhex(t) for t in tokens], running]
        if kind == "start":
            _, sid, uid, gid, pid, binding, verifier = change
            return ["start", sid, uid, gid, pid, bytes.fromhex(binding),
                    bytes.fromhex(verifier)]
        if kind == "resume":
            _, sid, fresh, verifier = change
            return ["resume", sid, fresh, bytes.fromhex(verifier)]
        return change
    except (TypeError, ValueError) as exc:
        raise JournalError(f"record seq {seq} holds a change that does not parse: "
                           f"{exc}") from None


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


def _head_v1(raw: bytes, base: bytes) -> Head:
    body, mac = raw[: _HEAD.size], raw[_HEAD.size :]
    expected = hashlib.blake2s(body, key=_head_key(base)).digest()
    magic, version, file_id, seq, tag = _HEAD.unpack(body)
    if not hmac.compare_digest(expected, mac) or magic != HEAD_MAGIC or version != 1:
        raise JournalError(f"{HEAD_NAME} does not verify (edited, or another service's)")
    return Head(file_id, seq, tag)


def _slot(raw: bytes, base: bytes, position: int) -> Head | None:
    """A version-2 head slot if it verifies (magic, version, its seq's parity naming its
    position, and the seq's commit token under the file it names), else None."""
    magic, version, file_id, seq, tag, token = _SLOT.unpack(raw)
    if magic != HEAD_MAGIC or version != 2 or seq % 2 != position:
        return None
    if not hmac.compare_digest(commit_token(base, file_id, seq), token):
        return None
    return Head(file_id, seq, tag)


def _parse_head(raw: bytes, base: bytes) -> Head:
    if len(raw) == HEAD_V1:  # version 1: one head, rewritten in place by each commit
        return _head_v1(raw, base)
    if len(raw) != HEAD_BYTES:
        raise JournalError(f"{HEAD_NAME} has {len(raw)} bytes, not {HEAD_BYTES}")
    slots = [_slot(raw[i * HEAD_SLOT : (i + 1) * HEAD_SLOT], base, i) for i in (0, 1)]
    valid = [h for h in slots if h is not None]
    if not valid:
        raise JournalError(f"{HEAD_NAME} does not verify (edited, or another service's)")
    if len(valid) == 1:
        return Head(valid[0].file_id, valid[0].seq, valid[0].tag, torn=True)
    a, b = valid
    if a.file_id != b.file_id or abs(a.seq - b.seq) != 1:
        raise JournalError(f"{HEAD_NAME}: its two slots do not name consecutive records of "
                           "one journal (edited)")
    return a if a.seq > b.seq else b


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


def _verify(data: bytes, base: bytes, head: Head) -> tuple[int, bytes, list[tuple[int, bytes]],
                                                           int]:
    """Verify a file's chain of records against its head: (version, file id, the
    payloads by seq, bytes of a torn last record)."""
    version, file_id, first_seq = _file_header(data)
    aead = ChaCha20Poly1305(_file_key(base, file_id))
    prev = _genesis(_file_key(base, file_id), data[: _HEADER.size])
    pos, seq = _HEADER.size, first_seq
    tags: dict[int, bytes] = {first_seq - 1: prev}  # what a new file's other slot names
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
    if head.torn and last != head.seq + 1:
        raise JournalError(f"{HEAD_NAME}: one slot does not verify, and {JOURNAL_NAME} ends "
                           f"at seq {last}, not at {head.seq + 1} as a torn head store leaves "
                           "it: edited, or records were cut off its end")
    if head.seq > last:
        raise JournalError(f"{JOURNAL_NAME} ends at seq {last} but its head says {head.seq} "
                           "was committed: records were cut off its end")
    if tags.get(head.seq) != head.tag:
        raise JournalError(f"record seq {head.seq} is not the one {HEAD_NAME} committed")
    return version, file_id, payloads, torn


def _snapshot(payload: bytes) -> dict[str, Any]:
    try:
        snapshot = json.loads(payload)
    except ValueError as exc:
        raise JournalError(f"the snapshot does not parse: {exc}") from None
    if not isinstance(snapshot, dict):
        raise JournalError("the first record is not a snapshot")
    return snapshot


def _records_v1(data: bytes, base: bytes, head: Head) -> Loaded:
    """A version-1 file: commits are JSON lists of changes, bytes in hex."""
    version, file_id, payloads, torn = _verify(data, base, head)
    records: list[tuple[int, list[Any]]] = []
    for s, p in payloads[1:]:
        try:
            group = json.loads(p)
        except ValueError as exc:
            raise JournalError(f"record seq {s} does not parse: {exc}") from None
        if not isinstance(group, list):
            raise JournalError(f"record seq {s} is not a list of changes")
        records += [(s, _from_v1(change, s)) for change in group]
    return Loaded(version, file_id, _snapshot(payloads[0][1]), records, payloads[-1][0], torn)


def _records_v2(data: bytes, base: bytes, head: Head) -> Loaded:
    """A version-2 file: commits are concatenated binary changes (``decode_changes``)."""
    version, file_id, payloads, torn = _verify(data, base, head)
    records = [(s, change) for s, p in payloads[1:] for change in decode_changes(p, s)]
    return Loaded(version, file_id, _snapshot(payloads[0][1]), records, payloads[-1][0], torn)


# Every format version this service reads; a newer service keeps the older readers.
_READERS = {1: _records_v1, 2: _records_v2}


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
    """Appends changes to the journal in one directory; ``commit`` writes them (one
    write per commit: group commit), with ``fsync`` syncs them, then stores the head
    slot. Only the service's event-loop thread uses it."""

    def __init__(self, dir_fd: int, static_private: bytes, *, fsync: bool = False) -> None:
        self._dir_fd = dir_fd
        self._base = _base_key(static_private)
        self._token_key = b""  # the current file's
        self._tokens = b""  # commit tokens of seqs _tokens_first ..
        self._tokens_first = 0
        self.fsync = fsync
        self._fd = -1
        self._head_fd = -1
        self._head_map: mmap.mmap | None = None
        self._aead: ChaCha20Poly1305 | None = None
        self._file_id = b""
        self._prev = b""  # the tag of record _seq
        self._prev_prev = b""  # the tag of record _seq - 1 (the genesis tag of a new file)
        self._seq = 0  # the last seq written
        self._buf = bytearray()  # changes appended since the last commit, encoded
        self._pending = 0
        self.tail_records = 0  # records since the snapshot
        self.tail_bytes = 0
        self.snapshot_bytes = 0
        self.commits = 0
        self.records = 0
        self.compaction_error: str | None = None

    @property
    def seq(self) -> int:
        return self._seq

    def _encode(self, payload: bytes | bytearray) -> bytes:
        assert self._aead is not None
        self._seq += 1
        seq = self._seq
        header = _REC.pack(JOURNAL_VERSION, seq, len(payload) + TAG_BYTES)
        sealed = self._aead.encrypt(_NONCE.pack(seq), payload, header + self._prev)
        self._prev_prev, self._prev = self._prev, sealed[-TAG_BYTES:]
        return header + sealed

    def append(self, change: Sequence[Any]) -> None:
        """Record one change (a list naming its kind first, byte fields as bytes); it is
        written by the next ``commit``."""
        self._buf += encode_change(change)
        self._pending += 1
        self.tail_records += 1
        self.records += 1

    def append_req(self, sid: int, plaintext: bytes, body: bytes | None, now: float,
                   wall: float, tokens: Sequence[bytes], running: Sequence[int] | None) -> None:
        """Record one executed request (the hot path: ``append(["req", ...])`` without
        building the list): its plaintext as received, its reply body (None for a wait that
        queued), and what its execution read from the world."""
        _encode_req(self._buf, sid, plaintext, body, now, wall, tokens, running)
        self._pending += 1
        self.tail_records += 1
        self.records += 1

    def commit(self) -> None:
        """Write the changes appended since the last commit as one record (group
        commit: one seal, one write), with ``fsync`` sync it, then store the head slot.
        Called before any reply is written, so a reply never precedes its changes."""
        if not self._pending:
            return
        data = self._encode(self._buf)
        self._buf.clear()
        self._pending = 0
        self.tail_bytes += len(data)
        n = os.write(self._fd, data)
        if n < len(data):  # short writes are rare (a full disk): write the rest
            view = memoryview(data)[n:]
            while view:
                view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fdatasync(self._fd)
        self._store_head()
        self.commits += 1

    def _slot(self, seq: int, tag: bytes) -> bytes:
        at = (seq - self._tokens_first) * TOKEN
        if not 0 <= at < len(self._tokens):
            self._tokens_first = seq - seq % _TOKENS_PER_CHUNK
            self._tokens = _tokens(self._token_key, self._tokens_first, _TOKENS_PER_CHUNK)
            at = (seq - self._tokens_first) * TOKEN
        return _SLOT.pack(HEAD_MAGIC, JOURNAL_VERSION, self._file_id, seq, tag,
                          self._tokens[at : at + TOKEN])

    def _store_head(self) -> None:
        """Store the slot of the seq just written (``seq % 2``) through the mapping: no
        system call. A crash can tear it; the other slot still names seq - 1, whole."""
        assert self._head_map is not None
        at = (self._seq & 1) * HEAD_SLOT
        self._head_map[at : at + HEAD_SLOT] = self._slot(self._seq, self._prev)
        if self.fsync:
            self._head_map.flush()  # msync

    def _write_head(self) -> None:
        """Write both slots with one ``pwrite`` and sync them (a new file: at start and
        at compaction): the slot of seq and that of seq - 1."""
        slots = {self._seq & 1: self._slot(self._seq, self._prev),
                 (self._seq - 1) & 1: self._slot(self._seq - 1, self._prev_prev)}
        if self._head_fd < 0:
            self._head_fd = os.open(HEAD_NAME, os.O_RDWR | os.O_CREAT | _FLAGS, 0o600,
                                    dir_fd=self._dir_fd)
            os.fchmod(self._head_fd, 0o600)
        os.pwrite(self._head_fd, slots[0] + slots[1], 0)  # whole or not at all
        os.fsync(self._head_fd)
        if self._head_map is None:
            self._head_map = mmap.mmap(self._head_fd, HEAD_BYTES)

    @property
    def pending(self) -> int:
        return self._pending

    def wants_compaction(self) -> bool:
        return self.tail_records >= COMPACT_RECORDS and self.tail_bytes > self.snapshot_bytes

    def compact(self, snapshot: dict[str, Any]) -> bool:
        """``start`` a new file from ``snapshot``; if the directory refuses (full, or no
        longer writable after ``--user``), keep appending to the current file and say
        so: the journal stays whole, only larger. True if it compacted."""
        saved = (self._aead, self._prev, self._prev_prev, self._file_id, self._seq,
                 self._token_key, self._tokens, self._tokens_first)
        try:
            self.start(snapshot)
        except OSError as exc:
            (self._aead, self._prev, self._prev_prev, self._file_id, self._seq,
             self._token_key, self._tokens, self._tokens_first) = saved
            with contextlib.suppress(OSError):
                os.unlink(NEW_NAME, dir_fd=self._dir_fd)
            with contextlib.suppress(OSError):
                self._write_head()  # in case it already named the new file
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
        self._token_key = _token_key(self._base, file_id)
        self._tokens = b""
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
        if self._head_map is not None:
            self._head_map.close()
            self._head_map = None
        for fd in (self._fd, self._head_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._head_fd = self._dir_fd = -1
