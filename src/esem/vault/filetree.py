"""The file tree: the vault's on-disk index of nodes, and its blob directory.

The tree is a table of TREE_SLOTS node slots, persisted as one JSON file that is only
ever replaced atomically (``storage.atomic_write``): a reader always sees a whole tree,
and a failed write (a full disk) leaves the previous tree intact. A node names its owner,
its file name, its size and its wrapped file key; the node in slot ``N`` keeps its
ciphertext in ``blobs/N.blob``, the untrusted directory.

Changing the tree is a read-modify-write of the whole table: read it from disk, find the
next free slot, prepare the node (write its blob), link it, persist. Two writers that
interleave read the same free slot and the same table; the last to persist erases the
other's node (a lost file) and may leave a node whose blob the other overwrote (a
corrupt file, caught by the blob's authentication). That is why ``Vault`` runs every
change under ``sem_filetree`` (initial value 1), and why a tampered ``sem_filetree``
corrupts data.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esem.vault.errors import Corrupt, VaultFull
from esem.vault.limits import TREE_SLOTS
from esem.vault.storage import atomic_write, remove_temp_files

TREE_NAME = "filetree.json"
BLOB_DIR = "blobs"
FORMAT = "esem-vault-filetree"


@dataclass(frozen=True)
class Node:
    owner: str
    name: str
    size: int  # plaintext bytes
    wrapped_key: bytes  # the file key wrapped by the master key (engine.Sealed)
    created: float  # seconds since the epoch

    def to_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "name": self.name, "size": self.size,
                "key": self.wrapped_key.hex(), "created": self.created}

    @classmethod
    def from_json(cls, d: Any) -> Node:
        if not isinstance(d, dict):
            raise TypeError("node is not an object")
        owner, name, size, created = d["owner"], d["name"], d["size"], d["created"]
        if not (isinstance(owner, str) and isinstance(name, str) and isinstance(size, int)
                and isinstance(created, int | float) and size >= 0):
            raise TypeError("node fields have the wrong types")
        return cls(owner, name, size, bytes.fromhex(d["key"]), float(created))


@dataclass
class TreeImage:
    """The tree as read from disk at one moment: slot -> node. Changes stay in memory
    until ``FileTree.persist``."""

    nodes: dict[int, Node] = field(default_factory=dict)

    def find(self, owner: str, name: str) -> tuple[int, Node] | None:
        for slot, node in self.nodes.items():
            if node.owner == owner and node.name == name:
                return slot, node
        return None

    def next_free(self) -> int:
        """The lowest free slot (slots are reused, as an on-disk node table does)."""
        for slot in range(TREE_SLOTS):
            if slot not in self.nodes:
                return slot
        raise VaultFull(f"the vault holds its maximum of {TREE_SLOTS} files")

    def link(self, slot: int, node: Node) -> int | None:
        """Put ``node`` in ``slot``; unlink an older node of the same name and return its
        slot (its blob is to be removed once the tree is persisted)."""
        old = self.find(node.owner, node.name)
        if old is not None:
            del self.nodes[old[0]]
        self.nodes[slot] = node
        return old[0] if old is not None else None

    def unlink(self, slot: int) -> Node:
        return self.nodes.pop(slot)


class FileTree:
    """The tree file and blob directory of one vault directory."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / TREE_NAME
        self.blobs = directory / BLOB_DIR

    def __repr__(self) -> str:
        return f"<FileTree {self.path}>"

    def create_if_missing(self) -> None:
        self.blobs.mkdir(mode=0o700, exist_ok=True)
        if not self.path.exists():
            self.persist(TreeImage())

    def read(self) -> TreeImage:
        """The whole tree; ``Corrupt`` if the file does not parse as one."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            raise Corrupt(f"the file tree {self.path} is missing") from None
        except ValueError as exc:
            raise Corrupt(f"the file tree {self.path} does not parse: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != 1:
            raise Corrupt(f"{self.path} is not an esem vault file tree (format 1)")
        image = TreeImage()
        seen: set[tuple[str, str]] = set()
        try:
            for key, raw in doc["nodes"].items():
                slot = int(key)
                if not 0 <= slot < TREE_SLOTS:
                    raise ValueError(f"slot {slot} out of range")
                node = Node.from_json(raw)
                if (node.owner, node.name) in seen:
                    raise ValueError(f"two nodes named {node.name!r} of {node.owner!r}")
                seen.add((node.owner, node.name))
                image.nodes[slot] = node
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Corrupt(f"the file tree {self.path} is malformed: {exc}") from None
        return image

    def persist(self, image: TreeImage) -> None:
        doc = {"format": FORMAT, "version": 1, "slots": TREE_SLOTS,
               "nodes": {str(s): n.to_json() for s, n in sorted(image.nodes.items())}}
        atomic_write(self.path, json.dumps(doc, separators=(",", ":")).encode())

    # ------------------------------------------------------------- blobs

    def blob_path(self, slot: int) -> Path:
        return self.blobs / f"{slot:06d}.blob"

    def write_blob(self, slot: int, blob: bytes) -> None:
        atomic_write(self.blob_path(slot), blob)

    def read_blob(self, slot: int, name: str) -> bytes:
        try:
            return self.blob_path(slot).read_bytes()
        except FileNotFoundError:
            raise Corrupt(f"the blob of {name!r} (slot {slot}) is missing") from None

    def remove_blob(self, slot: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(slot).unlink()

    def sweep(self) -> tuple[int, int]:
        """At start, before any request: remove temporary files of interrupted writes
        and blobs no node refers to (a put interrupted between its blob and its tree).
        Returns (temporary files, orphan blobs) removed."""
        temps = remove_temp_files(self.path.parent) + remove_temp_files(self.blobs)
        used = {self.blob_path(s).name for s in self.read().nodes}
        orphans = 0
        for blob in self.blobs.glob("*.blob"):
            if blob.name not in used:
                blob.unlink()
                orphans += 1
        return temps, orphans

