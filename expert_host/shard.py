"""The experts one host holds: its shard of a packed store, in RAM or memory-mapped.

In RAM, every blob is read once at start into one allocation and checked against its checksum
(with a progress bar); a fetch then reads memory only. Memory-mapped (`--mmap`), blobs stay in
the page cache / on the SSD and each is checked the first time it is served. Knows nothing of
gRPC: the servicer asks it for blobs by ExpertId."""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from tqdm import tqdm

from common.errors import StoreError
from common.expert_id import ExpertId
from common.store.reader import ExpertStore

log = logging.getLogger(__name__)


class ExpertShard:
    def __init__(self, store: ExpertStore, experts: list[ExpertId], *, mmap: bool = False, progress: bool | None = None) -> None:
        """`progress=None`: a progress bar when stderr is a terminal, log lines otherwise."""
        self.store = store
        self.manifest = store.manifest
        self.experts = sorted(experts)
        self.mmap = mmap
        self.blob_nbytes = store.blob_nbytes
        self._index = {eid: i for i, eid in enumerate(self.experts)}
        self._verified: set[ExpertId] = set()
        self._arena: torch.Tensor | None = None
        if not mmap:
            self._load_into_ram(progress)

    def _load_into_ram(self, progress: bool | None) -> None:
        total = len(self.experts) * self.blob_nbytes
        log.info("loading %d experts (%.2f GB) of %s into RAM", len(self.experts), total / 1e9, self.store.folder)
        started = time.perf_counter()
        self._arena = torch.empty((len(self.experts), self.blob_nbytes), dtype=torch.uint8)  # [experts, blob bytes]
        for eid in tqdm(self.experts, desc="loading experts", unit="expert", disable=None if progress is None else not progress):
            row = self._arena[self._index[eid]]
            row.copy_(self.store.expert_blob(eid))
            self.store.verify(eid, row)
        self._verified.update(self.experts)
        seconds = time.perf_counter() - started
        log.info("loaded and verified %d experts in %.1f s (%.2f GB/s)", len(self.experts), seconds, total / 1e9 / max(seconds, 1e-9))

    @property
    def ram_bytes(self) -> int:
        """Bytes of blobs held in this process's RAM (0 when memory-mapped)."""
        return 0 if self._arena is None else self._arena.numel()

    def holds(self, eid: ExpertId) -> bool:
        return eid in self._index

    def checksum_of(self, eid: ExpertId) -> str:
        return self.store.checksum_of(eid)

    async def blob(self, eid: ExpertId) -> memoryview:
        """The blob's bytes (a view, no copy), checked against its checksum at least once.
        Raises StoreError for a blob that fails its checksum, KeyError for one not held here."""
        index = self._index[eid]
        if self._arena is not None:
            return memoryview(self._arena[index].numpy())
        blob = self.store.expert_blob(eid)
        if eid not in self._verified:
            await asyncio.to_thread(self.store.verify, eid, blob)  # reads the file: not on the event loop
            self._verified.add(eid)
        return memoryview(blob.numpy())

    def describe(self) -> str:
        layers = sorted({eid.layer for eid in self.experts})
        where = "memory-mapped" if self.mmap else "in RAM"
        return f"{len(self.experts)} experts of {len(layers)} layers, {where}"
