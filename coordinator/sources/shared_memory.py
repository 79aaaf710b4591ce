"""A local expert host's experts read straight from its memory (`--local-host`).

The host started by local_host.py holds its shard in a file under /dev/shm (mode 0600, made
new by the host) instead of private RAM. Once it serves, this process maps the
same file and removes it at once: the memory lives on while either process maps it, and
nothing is left in /dev/shm whichever of them exits or is killed first.

`SharedExperts` is that mapping: the blobs in the host's order (the store's experts, sorted),
viewed without a copy. On CUDA it is registered as pinned memory (cudaHostRegister), so the
loader copies a blob from it to the device as from the in-process RAM source; where that fails
the blobs go through the loader's pinned staging buffers instead, which the log says.

`SharedMemoryHostSource` is the ExpertSource over it: fetches are reads of the mapping (no gRPC);
running experts (RunExperts), health and their stats are the ExpertPool's, over the host's Unix
socket."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.errors import HostError
from common.expert_id import ExpertId
from common.store.reader import ExpertStore

log = logging.getLogger(__name__)
ORIGIN = "local host (shared memory)"  # the name in bytes_by_source


class SharedExperts:
    def __init__(self, arena: torch.Tensor, index: dict[ExpertId, int], *, pinned: bool, copyable: bool) -> None:
        self._arena = arena  # [experts, blob bytes]
        self._index = index
        self.pinned = pinned  # registered with CUDA (unregistered at close)
        self.copyable = copyable  # the loader may copy to the device from it directly: pinned, or no CUDA device

    @classmethod
    def attach(cls, path: Path, store: ExpertStore, *, pin: bool) -> "SharedExperts":
        """Map the host's file of `store`'s experts, then remove it."""
        eids = sorted(store.manifest.experts)
        shape = (len(eids), store.blob_nbytes)
        try:
            size = path.stat().st_size
            if size != shape[0] * shape[1]:
                raise HostError(f"{path}: the local host's shared experts are {size} bytes, expected "
                                f"{shape[0]} x {shape[1]}: does it hold another store?")
            arena = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8).view(shape)
        finally:
            path.unlink(missing_ok=True)
        pinned = pin and _register_pinned(arena)
        return cls(arena, {eid: i for i, eid in enumerate(eids)}, pinned=pinned, copyable=pinned or not pin)

    def blob(self, eid: ExpertId) -> torch.Tensor:
        return self._arena[self._index[eid]]

    def close(self) -> None:
        if self._arena is not None and self.pinned:
            torch.cuda.synchronize()  # no copy from it may still be in flight (a prefetch, say)
            torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr())
        self._arena = None


def _register_pinned(arena: torch.Tensor) -> bool:
    """Page-lock the mapping for the device's copies; False (logged) where CUDA refuses."""
    code = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
    if int(code) != 0:
        log.warning("could not register the local host's shared experts as pinned memory (CUDA error %s): "
                    "copies go through the pinned staging buffers", int(code))
        return False
    return True


class SharedMemoryHostSource:
    """Fetches from the local host's shared memory; everything else from its ExpertPool."""

    def __init__(self, pool, shared: SharedExperts) -> None:
        self.name = "local-host"
        self.pool = pool
        self.shared = shared
        self.blob_nbytes = pool.blob_nbytes
        self._delivered = 0

    def resident_blob(self, eid: ExpertId) -> torch.Tensor | None:
        """The blob where it lies, if the device can copy it from there (pinned, or a CPU run)."""
        if not self.shared.copyable:
            return None
        self._delivered += self.blob_nbytes
        return self.shared.blob(eid)

    async def fetch_into(self, eid: ExpertId, out: torch.Tensor) -> None:
        out.copy_(self.shared.blob(eid))
        self._delivered += self.blob_nbytes

    def bytes_by_origin(self) -> dict[str, int]:
        return {ORIGIN: self._delivered, **{h: n for h, n in self.pool.bytes_by_origin().items() if n}}

    # Running experts where they live, and the hosts' state: the pool's.
    async def run_layer(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor, **kwargs):
        return await self.pool.run_layer(layer, experts, hidden, weights, **kwargs)

    def start_run_here(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor):
        return self.pool.start_run_here(layer, experts, hidden, weights)

    def finish_run_here(self, runs) -> torch.Tensor:
        return self.pool.finish_run_here(runs)

    def expert_seconds(self) -> float | None:
        return self.pool.expert_seconds()

    def host_status(self) -> dict[str, bool]:
        return self.pool.host_status()

    def run_seconds_by_origin(self) -> dict[str, float]:
        return self.pool.run_seconds_by_origin()

    def run_bytes_by_origin(self) -> dict[str, tuple[int, int]]:
        return self.pool.run_bytes_by_origin()

    def run_compute_seconds_by_origin(self) -> dict[str, float]:
        return self.pool.run_compute_seconds_by_origin()

    def close(self) -> None:
        self.pool.close()
        self.shared.close()
