"""ExpertRunner: runs a layer's chosen experts on this host's CPU (common/cpu_executor.py) and
returns their weighted sum, for RunExperts.

An expert is made ready for the CPU on its first use in a dtype and kept: a CpuExpert per
(expert, dtype), never evicted. What that costs in memory on top of the shard: a quantized expert
on the native kernel about 0.31 bytes per weight at 2 bits and 0.56 at 3 or 4 (codes at 2 or 4
bits, plus the fp16 scale and zero per group of 64); on torch's int4pack fallback about 0.56,
whatever its HQQ bits; an unquantized one nothing when the
compute dtype is the store's (its matrices stay views of the blob held in RAM), else a copy
in the compute dtype. With --mmap the blob read for the first use stays referenced instead.

The work runs in a ThreadPoolExecutor, never on the event loop; at most `max_running` calls
compute at once (torch spreads each over its intra-op threads) and at most `max_waiting` more
wait for a turn; a call beyond that is refused as busy (RESOURCE_EXHAUSTED), so a flood of
requests costs bounded memory. Knows nothing of gRPC or protobuf: tensors in, a tensor out.

Shapes: T = tokens, H = hidden size, n = experts of the call."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from common.cpu_executor import CpuExpert, run_experts
from common.errors import StoreError
from common.expert_id import ExpertId

from .request_checks import RequestRefused, RunPlan
from .shard import ExpertShard

log = logging.getLogger(__name__)
MEASURE_DTYPE = torch.bfloat16  # what a coordinator sends; Info's expert_ms is measured in it


class ExpertRunner:
    def __init__(self, shard: ExpertShard, *, max_running: int = 1, max_waiting: int = 16) -> None:
        self.shard = shard
        self.max_waiting = max_waiting
        self.calls = 0  # calls answered, for Info
        self._pool = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="run-experts")
        self._turns = asyncio.Semaphore(max_running)
        self._waiting = 0
        self._ready: dict[tuple[ExpertId, torch.dtype], CpuExpert] = {}
        self._ready_lock = threading.Lock()  # worker threads add to _ready

    async def run(self, plan: RunPlan) -> tuple[torch.Tensor, float]:
        """The weighted sum [T, H] float32 and the seconds spent computing (repacking included).
        Raises RequestRefused when too many calls wait already, StoreError for a blob read from
        disk that fails its checksum."""
        if self._turns.locked() and self._waiting >= self.max_waiting:
            raise RequestRefused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"RunExperts: this host is busy ({self.max_waiting} calls wait already); retry or use a replica")
        self._waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self._waiting -= 1
        try:
            dtype = plan.hidden.dtype
            blobs = {eid: await self.shard.blob(eid) for eid in plan.experts if (eid, dtype) not in self._ready}
            loop = asyncio.get_running_loop()
            output, seconds = await loop.run_in_executor(self._pool, self._compute, plan, blobs)
        finally:
            self._turns.release()
        self.calls += 1
        return output, seconds

    def _compute(self, plan: RunPlan, blobs: dict[ExpertId, memoryview]) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        experts = [self._expert(eid, plan.hidden.dtype, blobs.get(eid)) for eid in plan.experts]
        output = run_experts(plan.hidden, experts, plan.weights)  # [T, H] float32
        return output, time.perf_counter() - started

    def _expert(self, eid: ExpertId, dtype: torch.dtype, blob: memoryview | None) -> CpuExpert:
        key = (eid, dtype)
        with self._ready_lock:
            ready = self._ready.get(key)
        if ready is not None:
            return ready
        views = self.shard.store.layout.views(torch.frombuffer(blob, dtype=torch.uint8))
        expert = CpuExpert(views, dtype=dtype)  # two calls may both repack it; the first kept wins
        with self._ready_lock:
            return self._ready.setdefault(key, expert)

    async def measure_expert_ms(self, repeats: int = 5) -> float:
        """One held expert at batch 1 in MEASURE_DTYPE, in ms (the best of `repeats`, after its
        repacking); 0 when the shard holds none. That expert stays ready."""
        if not self.shard.experts:
            return 0.0
        eid = self.shard.experts[0]
        hidden = torch.randn(1, self.shard.manifest.model.hidden_size).to(MEASURE_DTYPE)  # [1, H]
        plan = RunPlan((eid,), hidden, torch.ones(1, 1))
        try:
            best = min([(await self.run(plan))[1] for _ in range(repeats + 1)][1:])  # the first repacks
        except StoreError as err:  # a blob on disk that fails its checksum: its fetches will say so too
            log.warning("could not measure the expert speed: %s", err)
            return 0.0
        self.calls = 0  # the measurement is no client's call
        log.info("one expert at batch 1 (%s) takes %.3f ms on this CPU", str(MEASURE_DTYPE).removeprefix("torch."),
                 best * 1e3)
        return best * 1e3

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
