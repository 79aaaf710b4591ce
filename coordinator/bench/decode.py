"""`bench`: decode speed of the offloading modes, side by side in one process and one report.

Modes (same store, same weights, same token stream):
  naive         no cache: every expert is copied to the device when a token needs it
  lru           K slots per layer, least recently used evicted
  lru+prefetch  the same, plus router lookahead loading the next layers' experts ahead
  resident      every expert on the device (the upper bound), where memory allows

Decode steps are fed a fixed, seeded random token stream (teacher forcing), so routing varies
from token to token as in real text rather than collapsing onto a loop of one token; routing
itself comes from random weights, which the report says. The breakdown per token comes from a
separate pass that synchronizes at each phase boundary (see phase_clock.py)."""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from common.errors import ConfigError
from common.store.reader import ExpertStore

from ..runtime.engine import resolve_device, resolve_dtype
from ..runtime.expert_cache import ExpertCache
from ..runtime.expert_loader import CopyTimer, ExpertLoader
from ..runtime.decoder import GraphedDecoder
from ..runtime.fetch_loop import FetchLoop
from ..runtime.kernels import quantized_linear_for
from ..runtime.model import DenseWeights, KVCache, Transformer
from ..runtime.moe import MoEBlock
from ..runtime.phase_clock import PHASES, PhaseClock
from ..runtime.prefetcher import RouterLookahead
from ..sources.local import RamSource

MODES = ("naive", "lru", "lru+prefetch", "resident")


@dataclass
class ModeResult:
    mode: str
    cache_experts: int
    skipped: str | None = None
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    hit_rate: float = 0.0
    prefetch_recall: float | None = None  # of the uses that were not resident before, the share a prefetch brought in
    prefetch_precision: float | None = None  # of the experts prefetched, the share used before eviction
    experts_copied_per_token: float = 0.0
    bytes_copied_per_token: float = 0.0
    link_gbps: float = 0.0  # bytes copied / decode time
    copy_busy_share: float = 0.0  # time the copy stream was busy / decode time
    copy_gbps_while_busy: float = 0.0
    peak_gpu_gb: float = 0.0
    host_rss_gb: float = 0.0
    breakdown_ms_per_token: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchReport:
    store: str
    device: str
    dtype: str
    expert_bits: int
    group_size: int
    expert_mb: float
    layers: int
    experts: int
    cache_experts: int
    prompt_tokens: int
    tokens: int
    pinned_peak_gbps: float
    results: list[ModeResult]
    cuda_graphs: bool = False
    host_peak_rss_gb: float = 0.0
    routing: str = "random weights (synthetic or untrained): hit rates and prefetch recall are not a trained model's"

    def result(self, mode: str) -> ModeResult | None:
        return next((r for r in self.results if r.mode == mode and r.skipped is None), None)

    def copy_bound(self, mode: str = "lru+prefetch") -> float | None:
        """tokens/s if the link did nothing but this mode's copies at the measured peak."""
        result = self.result(mode)
        if result is None or result.bytes_copied_per_token == 0:
            return None
        return self.pinned_peak_gbps * 1e9 / result.bytes_copied_per_token

    def to_dict(self) -> dict:
        data = asdict(self)
        data["copy_bound_tokens_per_s"] = {r.mode: self.copy_bound(r.mode) for r in self.results if r.skipped is None}
        return data


def measure_pinned_peak(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best host->device GB/s of a large pinned copy, measured now on this machine."""
    if device.type != "cuda":
        source, target = torch.empty(nbytes // 4, dtype=torch.uint8), torch.empty(nbytes // 4, dtype=torch.uint8)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            target.copy_(source)
            best = min(best, time.perf_counter() - started)
        return source.numel() / best / 1e9
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            target.copy_(host, non_blocking=True)
            end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del host, target
    return nbytes / best / 1e9


class _Bench:
    def __init__(self, store: str | Path, device: torch.device, dtype: torch.dtype, progress: bool, cuda_graphs: bool) -> None:
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.store = ExpertStore(store)
        self.config = self.store.config
        self.device, self.dtype = device, dtype
        self.quantized_linear = quantized_linear_for(device)
        self.fetch_loop = FetchLoop()
        self.source = RamSource(self.store, pin=device.type == "cuda", progress=progress)
        self.dense = DenseWeights.from_store_tensors(self.store.load_dense(), self.config, self.store.manifest.dense_quant,
                                                     device, dtype)
        self.dense_bytes = sum(t.numel() * t.element_size() for t in self._dense_tensors())
        self.loader = ExpertLoader(self.source, device, self.fetch_loop, staging_buffers=0)
        self.loader.timer = CopyTimer()

    def _dense_tensors(self):
        w = self.dense
        yield from (w.embed, w.norm) if w.lm_head is w.embed else (w.embed, w.norm, w.lm_head)
        for layer in w.layers:
            yield from (layer.input_norm, layer.post_attention_norm, layer.q_proj, layer.k_proj, layer.v_proj,
                        layer.o_proj, layer.router)

    def close(self) -> None:
        self.source.close()
        self.fetch_loop.close()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run_mode(self, mode: str, *, cache_experts: int, prefetch_depth: int, prompt: torch.Tensor,
                 stream: torch.Tensor, warmup: int, tokens: int, profile: int) -> ModeResult:
        c = self.config
        slots = {"naive": c.top_k, "resident": c.num_experts}.get(mode, cache_experts)
        result = ModeResult(mode, slots)
        if mode == "resident" and self.device.type == "cuda":
            need = c.num_layers * c.num_experts * self.store.blob_nbytes
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > free - (1 << 30):
                result.skipped = f"needs {need / 1e9:.1f} GB of expert slots, {free / 1e9:.1f} GB free"
                return result
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        cache = ExpertCache(layout=self.store.layout, num_layers=c.num_layers, slots_per_layer=slots, device=self.device,
                            loader=self.loader, forget_after_use=mode == "naive")
        predictor = None
        routers = [layer.router for layer in self.dense.layers]
        norms = [layer.post_attention_norm for layer in self.dense.layers]
        if mode == "lru+prefetch":
            predictor = RouterLookahead(routers, norms, c.rms_norm_eps, depth=prefetch_depth, experts_per_layer=c.top_k)
        moe = MoEBlock(c, routers, norms, cache, predictor, self.quantized_linear)
        model = Transformer(c, self.dense, moe, self.device, self.dtype)
        kv = KVCache(c, prompt.numel() + stream.numel() + 1, self.device, self.dtype)
        if mode == "resident":
            cache.load_all()
        try:
            self._sync()
            started = time.perf_counter()
            logits = model.forward(prompt, 0, kv)
            int(logits.argmax())
            result.prefill_tokens_per_s = prompt.numel() / (time.perf_counter() - started)
            position = prompt.numel()
            decoder = GraphedDecoder(model, kv) if self.cuda_graphs else None
            tokens_in = stream.tolist()

            def step(index: int) -> None:
                nonlocal position
                if decoder is not None:
                    logits = decoder.step(tokens_in[index], position)
                else:
                    logits = model.forward(stream[index : index + 1], position, kv)
                int(logits.argmax())  # the sampler's sync, as in the engine; the stream gives the next token
                position += 1

            for index in range(warmup):
                step(index)
            self._sync()
            before = cache.counters.totals()
            self.loader.timer.reset()
            started = time.perf_counter()
            for index in range(warmup, warmup + tokens):
                step(index)
            self._sync()
            decode_s = time.perf_counter() - started
            after = cache.counters.totals()
            busy = self.loader.timer.busy_seconds()
            delta = {k: after[k] - before[k] for k in after}
            self._fill(result, delta, decode_s, busy, tokens)
            clock = PhaseClock(self.device)
            model.clock = moe.clock = clock
            clock.start()
            for index in range(warmup + tokens, warmup + tokens + profile):
                step(index)
                clock.mark("other")
            model.clock = moe.clock = None
            result.breakdown_ms_per_token = {p: clock.seconds.get(p, 0.0) / profile * 1000 for p in PHASES}
            if self.device.type == "cuda":
                result.peak_gpu_gb = torch.cuda.max_memory_allocated(self.device) / 1e9
            result.host_rss_gb = psutil.Process().memory_info().rss / 1e9
        finally:
            del cache, model, moe, kv
            decoder = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return result

    def _fill(self, result: ModeResult, delta: dict, decode_s: float, busy_s: float, tokens: int) -> None:
        uses = delta["cache_hits"] + delta["cache_misses"]
        copies = delta["cache_misses"] + delta["prefetch_issued"]
        result.decode_tokens_per_s = tokens / decode_s
        result.hit_rate = delta["cache_hits"] / uses if uses else 0.0
        if delta["prefetch_issued"]:
            not_resident = delta["prefetch_hits"] + delta["cache_misses"]
            result.prefetch_recall = delta["prefetch_hits"] / not_resident if not_resident else 1.0
            result.prefetch_precision = delta["prefetch_hits"] / delta["prefetch_issued"]
        result.experts_copied_per_token = copies / tokens
        result.bytes_copied_per_token = delta["bytes_fetched"] / tokens
        result.link_gbps = delta["bytes_fetched"] / decode_s / 1e9
        result.copy_busy_share = busy_s / decode_s
        result.copy_gbps_while_busy = delta["bytes_fetched"] / busy_s / 1e9 if busy_s > 0 else 0.0


def cache_experts_for_budget(budget_gb: float, *, dense_bytes: int, blob_bytes: int, layers: int, experts: int,
                             reserve_bytes: int = 1 << 30) -> int:
    """Slots per layer that fit a GPU memory budget after the dense weights and a reserve."""
    per_slot_row = layers * blob_bytes
    slots = int((budget_gb * 1e9 - dense_bytes - reserve_bytes) // per_slot_row)
    if slots < 1:
        raise ConfigError(f"--gpu-budget-gb {budget_gb}: too small; the dense part alone needs {dense_bytes / 1e9:.1f} GB")
    return min(slots, experts)


def run_bench(*, store: str | Path, device: str = "cuda", dtype: str | None = None, cache_experts: int | None = None,
              gpu_budget_gb: float | None = None, tokens: int = 32, prompt_tokens: int = 16, warmup_tokens: int = 4,
              profile_tokens: int = 8, prefetch_depth: int = 1, modes: tuple[str, ...] = MODES, seed: int = 0,
              cuda_graphs: bool = True, progress: bool = True) -> BenchReport:
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--modes {','.join(unknown)}: choose from {', '.join(MODES)}")
    if tokens < 1 or prompt_tokens < 1:
        raise ConfigError("--tokens and --prompt-tokens must be at least 1")
    bench = _Bench(store, torch_device, torch_dtype, progress, cuda_graphs)
    try:
        c = bench.config
        if gpu_budget_gb is not None:
            cache_experts = cache_experts_for_budget(gpu_budget_gb, dense_bytes=bench.dense_bytes,
                                                     blob_bytes=bench.store.blob_nbytes, layers=c.num_layers,
                                                     experts=c.num_experts)
        cache_experts = min(cache_experts or 4, c.num_experts)
        if cache_experts < 1:
            raise ConfigError(f"--cache-experts {cache_experts}: needs at least 1 slot per layer")
        generator = torch.Generator().manual_seed(seed)
        total = warmup_tokens + tokens + profile_tokens
        prompt = torch.randint(3, c.vocab_size, (prompt_tokens,), generator=generator).to(torch_device)
        stream = torch.randint(3, c.vocab_size, (total,), generator=generator).to(torch_device)
        if prompt_tokens + total > c.max_position_embeddings:
            raise ConfigError(f"prompt + tokens exceed the model's context of {c.max_position_embeddings}")
        peak = measure_pinned_peak(torch_device)
        results = [
            bench.run_mode(mode, cache_experts=cache_experts, prefetch_depth=prefetch_depth, prompt=prompt,
                           stream=stream, warmup=warmup_tokens, tokens=tokens, profile=profile_tokens)
            for mode in modes
        ]
        manifest = bench.store.manifest
        return BenchReport(
            store=str(store),
            device=torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
            dtype=str(torch_dtype).removeprefix("torch."),
            expert_bits=manifest.expert_quant.bits,
            group_size=manifest.expert_quant.group_size,
            expert_mb=bench.store.blob_nbytes / 1e6,
            layers=c.num_layers,
            experts=c.num_experts,
            cache_experts=cache_experts,
            prompt_tokens=prompt_tokens,
            tokens=tokens,
            pinned_peak_gbps=peak,
            results=results,
            cuda_graphs=bench.cuda_graphs,
            host_peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        )
    finally:
        bench.close()
