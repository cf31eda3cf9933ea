"""The vault's operations: seal in the engine, index in the file tree, each gated.

``Vault`` is what a service thread calls for one request, whatever the transport:

* ``put``: seal the file inside the engine (under ``sem_service``), then add its node to
  the tree (under ``sem_filetree``: read the tree, find the next free slot, write the
  node's blob, link the node, persist).
* ``get``: look the node up and read its blob (under ``sem_filetree``, so a concurrent
  remove and reuse of the slot cannot hand it another file's blob), then unseal it in
  the engine (under ``sem_service``).
* ``ls``: read the tree (it is replaced atomically, so no lock is needed).
* ``rm``: unlink the node and persist (under ``sem_filetree``), then drop its blob.

Both semaphores come from ``sync.open_semaphores``; this module does not know which
backend it got. Files belong to the user who stored them: every lookup is by (owner,
name), and the owner is sealed into the blob's associated data.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from esem.api import SemaphoreHandle
from esem.errors import EsemError
from esem.vault.engine import SealingEngine
from esem.vault.errors import NotFound, SyncFailed, TooLarge
from esem.vault.filetree import FileTree, Node
from esem.vault.limits import MAX_UPLOAD_BYTES, TREE_WINDOW_S
from esem.vault.wire import check_name

log = logging.getLogger("esem.vault")


class Vault:
    """One vault directory's operations, called concurrently by the service threads."""

    def __init__(self, directory: Path, engine: SealingEngine, sem_service: SemaphoreHandle,
                 sem_filetree: SemaphoreHandle, *, tree_window_s: float = TREE_WINDOW_S) -> None:
        self.directory = directory
        self.engine = engine
        self.tree = FileTree(directory)
        self.sem_service = sem_service
        self.sem_filetree = sem_filetree
        self.tree_window_s = tree_window_s
        self._stats_lock = threading.Lock()
        self._counts = {"put": 0, "get": 0, "ls": 0, "rm": 0, "failed": 0}
        # Threads between a semaphore's wait and its post, now and at most: the measure of
        # what the semaphore really admitted (ENGINE_SLOTS and 1 when it is honest).
        self._inside = {"sem_service": 0, "sem_filetree": 0}
        self._peak = {"sem_service": 0, "sem_filetree": 0}

    def __repr__(self) -> str:
        return (f"<Vault {self.directory} sync={self.sem_service.backend} "
                f"{self._counts['put']} puts {self._counts['get']} gets>")

    def statistics(self) -> dict[str, Any]:
        with self._stats_lock:
            counts = dict(self._counts)
            peak = dict(self._peak)
        return {"requests": counts, "engine": self.engine.statistics(), "peak_inside": peak}

    def _count(self, op: str) -> None:
        with self._stats_lock:
            self._counts[op] += 1

    @contextlib.contextmanager
    def _gate(self, sem: SemaphoreHandle, label: str) -> Iterator[None]:
        """``sem.wait()`` ... ``sem.post()``, with backend failures as ``SyncFailed``."""
        try:
            sem.wait()
        except EsemError as exc:
            raise SyncFailed(f"{label}: wait failed: {type(exc).__name__}: {exc}") from exc
        with self._stats_lock:
            self._inside[label] += 1
            self._peak[label] = max(self._peak[label], self._inside[label])
        completed = False
        try:
            yield
            completed = True
        finally:
            with self._stats_lock:
                self._inside[label] -= 1
            try:
                sem.post()
            except EsemError as exc:
                if completed:
                    raise SyncFailed(f"{label}: post failed: {exc}") from exc
                log.error("%s: post failed while handling an error: %s", label, exc)

    @contextlib.contextmanager
    def _counted(self, op: str) -> Iterator[None]:
        try:
            yield
        except Exception:
            self._count("failed")
            raise
        self._count(op)

    # ---------------------------------------------------------------- operations

    def put(self, owner: str, name: str, data: bytes) -> None:
        check_name(name)
        if len(data) > MAX_UPLOAD_BYTES:
            raise TooLarge(f"{len(data)} bytes exceed the limit of {MAX_UPLOAD_BYTES}")
        with self._counted("put"):
            with self._gate(self.sem_service, "sem_service"):
                sealed = self.engine.seal(owner, name, data)
            with self._gate(self.sem_filetree, "sem_filetree"):
                image = self.tree.read()  # read the tree
                slot = image.next_free()  # find the next free slot
                self.tree.write_blob(slot, sealed.blob)  # prepare the node: its data
                node = Node(owner, name, len(data), sealed.wrapped_key, time.time())
                time.sleep(self.tree_window_s)  # the rest of the work: where races land
                replaced = image.link(slot, node)  # link it
                try:
                    self.tree.persist(image)  # persist
                except BaseException:
                    self.tree.remove_blob(slot)  # the slot is still free on disk
                    raise
                if replaced is not None:
                    self.tree.remove_blob(replaced)

    def get(self, owner: str, name: str) -> bytes:
        check_name(name)
        with self._counted("get"):
            with self._gate(self.sem_filetree, "sem_filetree"):
                found = self.tree.read().find(owner, name)
                if found is None:
                    raise NotFound(f"no file named {name!r}")
                slot, node = found
                blob = self.tree.read_blob(slot, name)
            with self._gate(self.sem_service, "sem_service"):
                return self.engine.unseal(owner, name, node.wrapped_key, blob)

    def ls(self, owner: str) -> list[dict[str, Any]]:
        with self._counted("ls"):
            nodes = [n for n in self.tree.read().nodes.values() if n.owner == owner]
        return [{"name": n.name, "size": n.size, "created": n.created}
                for n in sorted(nodes, key=lambda n: n.name)]

    def rm(self, owner: str, name: str) -> None:
        check_name(name)
        with self._counted("rm"), self._gate(self.sem_filetree, "sem_filetree"):
            image = self.tree.read()
            found = image.find(owner, name)
            if found is None:
                raise NotFound(f"no file named {name!r}")
            time.sleep(self.tree_window_s)
            image.unlink(found[0])
            self.tree.persist(image)
            self.tree.remove_blob(found[0])
