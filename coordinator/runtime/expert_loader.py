"""Moves an expert's bytes from a source into a device slot.

source -> (pinned staging buffer, unless the source already holds the blob in pinned memory)
-> slot, as an asynchronous copy on a dedicated copy stream that first waits until compute is
done with the slot's previous expert. A blob already in pinned RAM is copied straight from the
calling thread (no hop through the fetch loop); anything that needs I/O runs on the fetch loop.
On a CPU run the same paths are plain copies.

Staging buffers and the copy stream are made once; a load allocates nothing but its future."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque

import torch

from common.expert_id import ExpertId

from .fetch_loop import FetchLoop
from ..sources.base import ExpertSource


class CopyTimer:
    """Optional: times every device copy (CUDA events on the copy stream; wall time on CPU), so
    a benchmark can say how busy the link was. Off in normal runs."""

    def __init__(self) -> None:
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.cpu_seconds = 0.0
        self.bytes = 0

    def busy_seconds(self) -> float:
        """Total copy time so far (synchronizes with the copies it timed)."""
        total = self.cpu_seconds
        for start, end in self.events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000
        return total

    def reset(self) -> None:
        self.events.clear()
        self.cpu_seconds, self.bytes = 0.0, 0


class CopyBacklog:
    """How many loads are issued and not finished: fetches still on the fetch loop, plus device
    copies the copy stream has not done. What placement auto weighs a new copy's wait by. The
    copy stream finishes in issue order, so only the oldest pending copy is ever queried; a ring
    of events made once marks them (past RING pending copies the count stops growing)."""

    RING = 64

    def __init__(self, cuda: bool) -> None:
        self._events = [torch.cuda.Event() for _ in range(self.RING)] if cuda else []
        self._pending: deque[int] = deque()
        self._next = 0
        self.fetches_started = 0   # written by the caller's thread only
        self.fetches_finished = 0  # written by the fetch loop's thread only

    def copy_issued(self, stream: torch.cuda.Stream) -> None:
        if len(self._pending) < self.RING:
            index = self._next = (self._next + 1) % self.RING
            self._events[index].record(stream)
            self._pending.append(index)

    def __len__(self) -> int:
        while self._pending and self._events[self._pending[0]].query():
            self._pending.popleft()
        return len(self._pending) + self.fetches_started - self.fetches_finished


class ExpertLoader:
    def __init__(self, source: ExpertSource, device: torch.device, fetch_loop: FetchLoop, *, staging_buffers: int = 4) -> None:
        self.source = source
        self.device = device
        self.fetch_loop = fetch_loop
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.timer: CopyTimer | None = None
        self.backlog = CopyBacklog(self.cuda)
        self._staging: asyncio.Queue[torch.Tensor] | None = None
        with torch.inference_mode(False):  # written from the fetch loop's thread
            self._staging_buffers = [
                torch.empty(source.blob_nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(staging_buffers if self.cuda else 0)
            ]

    def load(self, eid: ExpertId, slot: torch.Tensor, slot_free: torch.cuda.Event | None,
             slot_ready: torch.cuda.Event | None) -> concurrent.futures.Future[None] | None:
        """Start filling `slot` with `eid`. Returns None when the copy is already issued (CUDA,
        blob in pinned RAM: `slot_ready` is recorded behind it); else a future that resolves
        once the copy is issued (CUDA: `slot_ready` recorded) or done (CPU)."""
        if self.cuda:
            resident = self.source.resident_blob(eid)
            if resident is not None:
                self._copy(resident, slot, slot_free, slot_ready)
                return None
        self.backlog.fetches_started += 1
        return self.fetch_loop.submit(self._load(eid, slot, slot_free, slot_ready))

    async def _load(self, eid: ExpertId, slot: torch.Tensor, slot_free, slot_ready) -> None:
        try:
            await self._fetch_and_copy(eid, slot, slot_free, slot_ready)
        finally:
            self.backlog.fetches_finished += 1

    async def _fetch_and_copy(self, eid: ExpertId, slot: torch.Tensor, slot_free, slot_ready) -> None:
        if not self.cuda:
            started = time.perf_counter()
            resident = self.source.resident_blob(eid)
            if resident is not None:
                slot.copy_(resident)
            else:
                await self.source.fetch_into(eid, slot)
            if self.timer is not None:
                self.timer.cpu_seconds += time.perf_counter() - started
                self.timer.bytes += slot.numel()
            return
        staging = await self._take_staging()
        try:
            await self.source.fetch_into(eid, staging)
            self._copy(staging, slot, slot_free, slot_ready, counted=True)  # in the backlog as a fetch until done
            # The staging buffer is free again only once the device has read it.
            await asyncio.to_thread(slot_ready.synchronize)
        finally:
            self._staging.put_nowait(staging)

    async def _take_staging(self) -> torch.Tensor:
        if self._staging is None:  # made on the loop's own thread, where it is used
            self._staging = asyncio.Queue()
            for buffer in self._staging_buffers:
                self._staging.put_nowait(buffer)
        return await self._staging.get()

    def _copy(self, host: torch.Tensor, slot: torch.Tensor, slot_free, slot_ready, *, counted: bool = False) -> None:
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slot_free)
            if self.timer is not None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            slot.copy_(host, non_blocking=True)
            slot_ready.record(self.copy_stream)
            if not counted:
                self.backlog.copy_issued(self.copy_stream)
            if self.timer is not None:
                end.record(self.copy_stream)
                self.timer.events.append((start, end))
                self.timer.bytes += slot.numel()
