"""The experts one host holds: its shard of a packed store, in RAM or read from disk per fetch.

In RAM, every blob is read once at start into one allocation and checked against its checksum
(with a progress bar); a fetch then reads memory only. With `--mmap` (the name is older than the
way it reads), blobs stay in the page cache / on the SSD and each fetch preads its blob into a
fresh buffer: no memory map, so a file that shrinks or changes is a StoreError naming it (the
servicer answers DATA_LOSS and serves other experts), never a SIGBUS. The blob is checked on
its first read and whenever its file may have changed (ExpertStore.read_blob_into). With a
`shared_file` (`--shared-memory`, what `--local-host` asks for), the RAM copy is that file, made
new with mode 0600 (on /dev/shm: memory, not disk), the blobs in the order of `experts`, so that
a coordinator on this machine can map it and read the experts without any call (the caller
removes the file when done). Knows nothing of gRPC: the servicer asks it for blobs by ExpertId."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.errors import StoreError
from common.expert_id import ExpertId
from common.store.reader import ExpertStore

log = logging.getLogger(__name__)
# A host that stops while its shard still loads (its coordinator killed at start) removes the
# shared file on the way out; the loading thread must not make it after that, or it outlives
# both processes. Creating and mapping it, and closing the door, take this lock.
_arenas_lock = threading.Lock()
_arenas_closed = False


def close_shared_arenas(path: Path | None) -> None:
    """No shared arena is made from now on in this process; `path`'s file (if any) is removed."""
    global _arenas_closed
    with _arenas_lock:
        _arenas_closed = True
        if path is not None:
            path.unlink(missing_ok=True)


class ExpertShard:
    def __init__(self, store: ExpertStore, experts: list[ExpertId], *, mmap: bool = False, progress: bool | None = None,
                 shared_file: Path | None = None) -> None:
        """`progress=None`: a progress bar when stderr is a terminal, log lines otherwise."""
        self.store = store
        self.manifest = store.manifest
        self.experts = sorted(experts)
        self.mmap = mmap
        self.blob_nbytes = store.blob_nbytes
        self._index = {eid: i for i, eid in enumerate(self.experts)}
        self._arena: torch.Tensor | None = None
        if not mmap:
            self._load_into_ram(progress, shared_file)

    def _load_into_ram(self, progress: bool | None, shared_file: Path | None) -> None:
        total = len(self.experts) * self.blob_nbytes
        log.info("loading %d experts (%.2f GB) of %s into RAM", len(self.experts), total / 1e9, self.store.folder)
        started = time.perf_counter()
        shape = (len(self.experts), self.blob_nbytes)  # [experts, blob bytes]
        self._arena = torch.empty(shape, dtype=torch.uint8) if shared_file is None else _shared_arena(shared_file, shape)
        for eid in tqdm(self.experts, desc="loading experts", unit="expert", disable=None if progress is None else not progress):
            self.store.read_blob_into(eid, self._arena[self._index[eid]], always_verify=True)
        seconds = time.perf_counter() - started
        log.info("loaded and verified %d experts in %.1f s (%.2f GB/s)", len(self.experts), seconds, total / 1e9 / max(seconds, 1e-9))

    @property
    def ram_bytes(self) -> int:
        """Bytes of blobs held in this process's RAM (0 with --mmap: read per fetch)."""
        return 0 if self._arena is None else self._arena.numel()

    def holds(self, eid: ExpertId) -> bool:
        return eid in self._index

    def checksum_of(self, eid: ExpertId) -> str:
        return self.store.checksum_of(eid)

    async def blob(self, eid: ExpertId) -> memoryview:
        """The blob's bytes: a view of the RAM copy, or a fresh buffer read from the file.
        Raises StoreError for a file that shrank or a blob that fails its checksum, KeyError for
        one not held here."""
        index = self._index[eid]
        if self._arena is not None:
            return memoryview(self._arena[index].numpy())
        blob = await asyncio.to_thread(self.store.expert_blob, eid)  # file I/O: not on the event loop
        return memoryview(blob.numpy())

    def describe(self) -> str:
        layers = sorted({eid.layer for eid in self.experts})
        where = "read from the store's files per fetch" if self.mmap else "in RAM"
        return f"{len(self.experts)} experts of {len(layers)} layers, {where}"


def _shared_arena(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """A new file of the arena's size at `path`, only this user's (refused if it exists), mapped
    shared: what we write there, a coordinator that maps the file sees."""
    nbytes = shape[0] * shape[1]
    # Made and mapped under the lock: torch.from_file opens the path with O_CREAT, so a host
    # exit that removed the file between the two would see it made again, and left behind.
    with _arenas_lock:
        if _arenas_closed:
            raise StoreError(f"--shared-memory {path}: the host is stopping; not made")
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if nbytes:  # reserved now: a full /dev/shm is an error here, not a SIGBUS at some write later
                os.posix_fallocate(descriptor, 0, nbytes)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise StoreError(f"--shared-memory {path}: cannot reserve {nbytes / 1e9:.2f} GB there ({err.strerror})") from None
        finally:
            os.close(descriptor)
        if nbytes == 0:
            return torch.empty(shape, dtype=torch.uint8)
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8).view(shape)
