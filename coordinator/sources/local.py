"""Local sources: the store in host RAM (pinned, verified at load) or read from disk per fetch.

RamSource reads every blob once at start, checks its checksum, and keeps it in pinned memory so
the device copies straight from it. DiskSource leaves the blobs in the page cache / on the SSD
and reads each one (pread, no memory map: a file that shrinks gives a StoreError, not SIGBUS)
into the loader's pinned staging buffer when it is fetched; ExpertStore.read_blob_into checks
it on its first read and whenever its file may have changed since."""

from __future__ import annotations

import asyncio

import torch
from tqdm import tqdm

from common.expert_id import ExpertId
from common.store.reader import ExpertStore


def _pinning_possible() -> bool:
    return torch.cuda.is_available()


class RamSource:
    def __init__(self, store: ExpertStore, *, pin: bool | None = None, progress: bool = True) -> None:
        self.name = "ram"
        self.store = store
        self.blob_nbytes = store.blob_nbytes
        pin = _pinning_possible() if pin is None else pin
        eids = sorted(store.manifest.experts)
        # One allocation for all blobs: one pinned region, views per expert.
        self._arena = torch.empty((len(eids), self.blob_nbytes), dtype=torch.uint8, pin_memory=pin)
        self._index = {eid: i for i, eid in enumerate(eids)}
        for eid in tqdm(eids, desc="loading experts into RAM", unit="expert", disable=not progress):
            store.read_blob_into(eid, self._arena[self._index[eid]], always_verify=True)
        self._delivered = 0

    def resident_blob(self, eid: ExpertId) -> torch.Tensor:
        self._delivered += self.blob_nbytes
        return self.blob(eid)

    def blob(self, eid: ExpertId) -> torch.Tensor:
        """The expert's verified blob in this process's memory, not counted as delivered to the
        device (the CPU runner reads it where it lies)."""
        return self._arena[self._index[eid]]

    async def fetch_into(self, eid: ExpertId, out: torch.Tensor) -> None:
        out.copy_(self.resident_blob(eid))

    def bytes_by_origin(self) -> dict[str, int]:
        return {"ram": self._delivered}

    def close(self) -> None:
        self._arena = None


class DiskSource:
    def __init__(self, store: ExpertStore) -> None:
        self.name = "disk"
        self.store = store
        self.blob_nbytes = store.blob_nbytes
        self._delivered = 0

    def resident_blob(self, eid: ExpertId) -> None:
        return None

    def blob(self, eid: ExpertId) -> torch.Tensor:
        """The expert's blob read from its file now (verified per the store's policy), for the CPU runner."""
        out = torch.empty(self.blob_nbytes, dtype=torch.uint8)
        self.store.read_blob_into(eid, out)
        return out

    async def fetch_into(self, eid: ExpertId, out: torch.Tensor) -> None:
        await asyncio.to_thread(self.store.read_blob_into, eid, out)  # file I/O: not on the fetch loop
        self._delivered += self.blob_nbytes

    def bytes_by_origin(self) -> dict[str, int]:
        return {"disk": self._delivered}

    def close(self) -> None:
        pass
