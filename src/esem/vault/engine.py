"""The sealing engine: AES-256-GCM with per-file keys, in exactly ENGINE_SLOTS slots.

It stands for the enclave of the published case study. An enclave has a fixed number of
thread slots (TCS); the host's ``sem_service`` semaphore, initial value ENGINE_SLOTS, is
what keeps the number of service threads inside within that bound. The engine counts
its occupants itself, under its own lock, and refuses an entrant beyond the last slot
with ``NoSlot``: the request fails. With an honest semaphore that never happens; with a
semaphore whose count was raised behind the service's back it does, and that is the
*service-thread blocking* harm the demo measures.

Sealing a file: a fresh 256-bit key encrypts it with AES-256-GCM under a random 96-bit
nonce, the owner and name as associated data (a blob moved to another name fails to
open); the file key is wrapped with the master key (AES key wrap, RFC 3394) and kept in
the file tree, the ciphertext goes to the untrusted blob directory. ENGINE_WORK_S models
the rest of an enclave call (transition, paging): it is the time a slot stays taken.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from esem.vault.errors import Corrupt, NoSlot
from esem.vault.limits import ENGINE_SLOTS, ENGINE_WORK_S

BLOB_MAGIC = b"EVB1"  # esem vault blob, format 1
NONCE_BYTES = 12
KEY_BYTES = 32
MASTER_KEY_BYTES = 32


@dataclass(frozen=True)
class Sealed:
    wrapped_key: bytes  # the file key under the master key: goes into the tree
    blob: bytes  # BLOB_MAGIC | nonce | ciphertext+tag: goes to the untrusted directory


def _aad(owner: str, name: str) -> bytes:
    return b"esem-vault/v1\0" + owner.encode() + b"\0" + name.encode("utf-8", "surrogatepass")


class SealingEngine:
    """Seal and unseal files; at most ``slots`` threads inside at once, else ``NoSlot``."""

    def __init__(self, master_key: bytes, *, slots: int = ENGINE_SLOTS,
                 work_s: float = ENGINE_WORK_S) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        if slots < 1 or work_s < 0:
            raise ValueError("slots must be >= 1 and work_s >= 0")
        self._master = master_key
        self.slots = slots
        self.work_s = work_s
        self._lock = threading.Lock()
        # Invariant, under _lock: 0 <= occupied <= peak_occupied <= slots.
        self._occupied = 0
        self.entries = 0  # admitted
        self.refusals = 0  # turned away: each one is a failed request
        self.peak_occupied = 0

    def __repr__(self) -> str:
        return (f"<SealingEngine {self._occupied}/{self.slots} slots taken, "
                f"{self.entries} entries, {self.refusals} refused>")

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"slots": self.slots, "occupied": self._occupied, "entries": self.entries,
                    "refusals": self.refusals, "peak_occupied": self.peak_occupied}

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        with self._lock:
            if self._occupied >= self.slots:
                self.refusals += 1
                raise NoSlot(f"the sealing engine has no free slot ({self.slots} of "
                             f"{self.slots} taken): more service threads entered than "
                             "sem_service admits")
            self._occupied += 1
            self.entries += 1
            self.peak_occupied = max(self.peak_occupied, self._occupied)
        try:
            yield
        finally:
            with self._lock:
                self._occupied -= 1

    def seal(self, owner: str, name: str, data: bytes) -> Sealed:
        with self._slot():
            key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
            nonce = os.urandom(NONCE_BYTES)
            ciphertext = AESGCM(key).encrypt(nonce, data, _aad(owner, name))
            wrapped = aes_key_wrap(self._master, key)
            time.sleep(self.work_s)
        return Sealed(wrapped, BLOB_MAGIC + nonce + ciphertext)

    def unseal(self, owner: str, name: str, wrapped_key: bytes, blob: bytes) -> bytes:
        with self._slot():
            time.sleep(self.work_s)
            head = len(BLOB_MAGIC) + NONCE_BYTES
            if len(blob) < head + 16 or not blob.startswith(BLOB_MAGIC):
                raise Corrupt(f"the blob of {name!r} is not a sealed file")
            try:
                key = aes_key_unwrap(self._master, wrapped_key)
                return AESGCM(key).decrypt(blob[len(BLOB_MAGIC):head], blob[head:],
                                           _aad(owner, name))
            except (InvalidUnwrap, InvalidTag, ValueError):
                raise Corrupt(f"{name!r} failed authentication: its blob or key was "
                              "altered or belongs to another file") from None
