"""The engine: opens a store, puts the dense weights on the device, wires the expert cache to a
source and a prefetcher, and runs the token loop (prefill on the prompt path, then one decode
step per token on the decode path, decoder.py).

    with Engine.open("STORE", device="cuda", cache_experts=4) as engine:
        for piece in engine.generate("Hello", max_new_tokens=32):
            print(piece, end="", flush=True)

Every entry point (generate, serve, bench, the Python API) builds an Engine from EngineOptions
(engine_options.py) and reads its counters through `snapshot()`. One generation runs at a time;
others wait for the engine's lock. See docs/architecture.md for the whole map."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from common.errors import ConfigError, StoreError
from common.store.reader import ExpertStore

from ..sources.base import ExpertSource
from ..sources.local import DiskSource, RamSource
from .counters import EngineSnapshot, ExpertCounters
from .decoder import Decoder
from .engine_options import GPU_RESERVE_BYTES, EngineOptions, cache_experts_for_budget
from .expert_cache import ExpertCache
from .expert_loader import ExpertLoader
from .fetch_loop import FetchLoop
from .generation import AsyncGeneration, Generation
from .kernels import grouped_experts_for, int4_linear, quantized_linear_for, switched_on
from .model import KVCache, Transformer
from .placement import HostRunner, LocalCpuRunner, PlacementDispatcher, measure_copy_seconds
from .moe import MoEBlock
from .prefetcher import RouterLookahead
from .routing_trace import RoutingHook, RoutingRecorder, RoutingReplay, RoutingTrace
from .sampler import Sampler, SamplingParams
from .weights import DenseWeights

SourceFactory = Callable[[ExpertStore, FetchLoop], ExpertSource]
CACHE_MODES = ("naive", "lru", "lru+prefetch", "resident")  # bench's side-by-side modes


def load_tokenizer(folder: Path):
    """The store's tokenizer, or None for a store without one (synthetic stores)."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise StoreError(f"{folder}: cannot load the tokenizer ({err})") from None


class Engine:
    def __init__(self, store: ExpertStore, options: EngineOptions, source: str | SourceFactory) -> None:
        self.store = store
        self.config = store.config
        self.options = options.for_model(self.config)
        self.device = self.options.torch_device()
        self.dtype = self.options.torch_dtype(self.device)
        self._closers: list[Callable[[], None]] = []
        self.fetch_loop = FetchLoop()
        self._closers.append(self.fetch_loop.close)
        self.counters = ExpertCounters(self.config.num_layers)  # lifetime counts, across cache rebuilds
        self.cache: ExpertCache | None = None
        self._runner = None  # placement run/auto: runs experts where they live
        self._kv: KVCache | None = None
        self._decoder: Decoder | None = None
        self.routing_hook: RoutingHook | None = None  # a routing trace being recorded or replayed
        self._lock = threading.Lock()
        try:
            self.source = self._make_source(source)
            self._closers.insert(0, self.source.close)
            self.tokenizer = load_tokenizer(store.folder)
            # MOE_EDGE_INT4_ATTENTION=0: decode tokens read the bf16 projections, as prompts do
            int4_decode = self.options.fused_kernels and switched_on(self.device, int4_linear.SWITCH)
            self.dense = DenseWeights.from_store_tensors(
                store.load_dense(), self.config, store.manifest.dense_quant, self.device, self.dtype,
                int4_decode=int4_decode,
            )
            self.loader = ExpertLoader(self.source, self.device, self.fetch_loop)
            self.quantized_linear = quantized_linear_for(self.device, fused=self.options.fused_kernels)
            if self.options.gpu_budget_gb is not None:
                slots = cache_experts_for_budget(self.options.gpu_budget_gb, dense_bytes=self.dense.nbytes(),
                                                 blob_bytes=store.blob_nbytes, layers=len(self.config.moe_layers),
                                                 experts=self.config.num_experts)
                self.options = replace(self.options, cache_experts=slots)
            self._build(slots=self.options.cache_experts, prefetch=self.options.prefetch)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, store: str | Path, *, source: str | SourceFactory = "ram", **options) -> "Engine":
        """Open a packed store. Options are EngineOptions' fields (device, dtype, cache_experts,
        gpu_budget_gb, prefetch, prefetch_depth, prefetch_width, fused_kernels, cuda_graphs,
        placement, prompt_chunk, progress); `source` is "ram", "disk" or a factory for remote sources."""
        engine_options = EngineOptions(source=source if isinstance(source, str) else "custom", **options)  # checks first
        return cls.from_options(store, engine_options, None if isinstance(source, str) else source)

    @classmethod
    def from_options(cls, store: str | Path, options: EngineOptions, source_factory: SourceFactory | None = None) -> "Engine":
        """Open a store with options already made (the CLI's way); `source_factory` for remote
        sources, else options.source names a local one."""
        local = source_factory is None  # remote sources need no expert files here
        return cls(ExpertStore(store, with_experts=local), options, options.source if local else source_factory)

    def _make_source(self, source: str | SourceFactory) -> ExpertSource:
        if callable(source):
            return source(self.store, self.fetch_loop)
        if source == "ram":
            return RamSource(self.store, pin=self.device.type == "cuda", progress=self.options.progress)
        return DiskSource(self.store)

    def _build(self, *, slots: int, prefetch: bool, forget_after_use: bool = False) -> None:
        """(Re)make the expert cache, the MoE block and the model around the loaded dense weights.
        The old cache is freed first, so device memory never holds two."""
        self._free_cache()
        c = self.config
        self.cache = ExpertCache(layout=self.store.layout, num_layers=c.num_layers, slots_per_layer=slots,
                                 device=self.device, loader=self.loader, forget_after_use=forget_after_use,
                                 counters=self.counters, expert_layers=c.moe_layers)
        predictor = None
        if prefetch:
            predictor = RouterLookahead(c, self.dense.layers, depth=self.options.depth,
                                        experts_per_layer=self.options.prefetch_width, prompt_experts_per_layer=slots)
        self.moe = MoEBlock(c, self.dense.layers, self.cache, predictor, self.quantized_linear, self.counters)
        self.moe.routing_hook = self.routing_hook
        self.moe.grouped = grouped_experts_for(self.device, self.store.layout, self.dtype, fused=self.options.fused_kernels)
        if self.options.placement != "copy" and not forget_after_use:
            self._place_misses()
        self.model = Transformer(c, self.dense, self.moe, self.device, self.dtype)

    def _free_cache(self) -> None:
        self.cache = self.moe = self.model = self._decoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _place_misses(self) -> None:
        """Placement run/auto: a runner for the experts that run where they live, and the
        dispatcher that chooses per miss (placement.py)."""
        self._make_runner()
        self.moe.elsewhere = self._runner
        self.moe.dispatcher = PlacementDispatcher(self.cache, self.moe.dispatcher, self._runner,
                                                  placement=self.options.placement,
                                                  copy_seconds_per_expert=self._copy_seconds, counters=self.counters)

    def _make_runner(self) -> None:
        """The runner of experts where they live: this machine's CPU for a local source, the
        hosts for expert hosts; made once, with the copy it competes with measured."""
        if self._runner is not None:
            return
        if isinstance(self.source, (RamSource, DiskSource)):
            self._runner = LocalCpuRunner(self.source, self.store.layout, self.dtype, self.config.hidden_size)
            self._runner.measure(min(self.store.manifest.experts))  # auto's first estimate of a run
        elif callable(getattr(self.source, "run_layer", None)):  # expert hosts run their own experts
            self._runner = HostRunner(self.source, self.fetch_loop, hidden_size=self.config.hidden_size, dtype=self.dtype)
        else:
            raise ConfigError(f"--placement {self.options.placement}: this expert source cannot run experts; "
                              "use --placement copy")
        self._closers.insert(0, self._runner.close)
        self._copy_seconds = measure_copy_seconds(self.device, self.store.blob_nbytes)
        if isinstance(self._runner, HostRunner):  # a copy from a host crosses its network link first
            self._copy_seconds += self._runner.fetch_seconds(min(self.store.manifest.experts), self.store.blob_nbytes)

    @property
    def runs_elsewhere_on(self) -> str:
        """Where placement run/auto runs an expert that is not on the device: "cpu" or "host"."""
        return "host" if callable(getattr(self.source, "run_layer", None)) else "cpu"

    def prepare_runs(self, *, progress: bool = False) -> float:
        """Make every expert of the store ready to run where it lives (repacked on this CPU, or
        on its host), so that placement run/auto pays no first-run cost later; the seconds it took."""
        with self._lock:
            started = time.perf_counter()
            self._make_runner()
            self._runner.warm(sorted(self.store.manifest.experts), progress=progress)
            return time.perf_counter() - started

    def use_cache_mode(self, mode: str, placement: str | None = None) -> None:
        """Rebuild the cache as one of bench's modes (the engine's own options give K and depth):
        naive (no caching, every use a copy), lru, lru+prefetch, resident (every expert on the
        device, loaded now). `placement` (copy, run, auto) replaces the engine's for the misses of
        lru and lru+prefetch; naive and resident copy. Raises ConfigError if resident does not fit
        in device memory."""
        c = self.config
        if mode not in CACHE_MODES:
            raise ConfigError(f"--modes {mode}: choose from {', '.join(CACHE_MODES)}")
        if placement is not None:
            if placement != "copy" and mode in ("naive", "resident"):
                raise ConfigError(f"--placement {placement}: {mode} has no misses to place; it copies")
            self.options = replace(self.options, placement=placement)  # checked as it is made
        with self._lock:
            if mode == "resident" and self.device.type == "cuda":
                self._free_cache()  # to see what the device has without it
                need = len(c.moe_layers) * c.num_experts * self.store.blob_nbytes
                free, _ = torch.cuda.mem_get_info(self.device)
                if need > free - GPU_RESERVE_BYTES:
                    self._build(slots=self.options.cache_experts, prefetch=self.options.prefetch)
                    raise ConfigError(f"needs {need / 1e9:.1f} GB of expert slots, {free / 1e9:.1f} GB free")
            slots = {"naive": c.top_k, "resident": c.num_experts}.get(mode, self.options.cache_experts)
            self._build(slots=slots, prefetch=mode == "lru+prefetch", forget_after_use=mode == "naive")
            if mode == "resident":
                self.cache.load_all()

    def record_routing(self, made_by: dict | None = None) -> RoutingRecorder:
        """Record the routing of the next generation (its prompt, then each decode step):
        `recorder.trace().write(path)` afterwards. Changes no token; replaces any replay."""
        c, options = self.config, self.options
        recorder = RoutingRecorder(moe_layers=c.moe_layers, experts=c.num_experts, top_k=c.top_k,
                                   lookahead_depth=options.depth if options.prefetch else 0,
                                   lookahead_width=options.prefetch_width if options.prefetch else 0,
                                   made_by=made_by)
        self._set_routing_hook(recorder)
        return recorder

    def replay_routing(self, trace: RoutingTrace, *, source: str = "the trace") -> RoutingReplay:
        """Route every following generation as `trace` did, from its start (routing_trace.py
        says how); ConfigError if its experts per layer or top-k differ from this store's."""
        c = self.config
        replay = RoutingReplay(trace, moe_layers=c.moe_layers, experts=c.num_experts, top_k=c.top_k, source=source)
        self._set_routing_hook(replay)
        return replay

    def stop_routing_trace(self) -> None:
        """Route by the routers again, recording nothing."""
        self._set_routing_hook(None)

    def _set_routing_hook(self, hook: RoutingHook | None) -> None:
        with self._lock:
            self.routing_hook = hook
            if self.moe is not None:
                self.moe.routing_hook = hook

    def snapshot(self) -> EngineSnapshot:
        """The lifetime counters, bytes per source and host health, now (any thread)."""
        def optional(name: str) -> dict:  # what only the sources of expert hosts report
            read = getattr(self.source, name, None)
            return read() if callable(read) else {}

        run_bytes = optional("run_bytes_by_origin")  # host -> (sent, received)
        compute = optional("run_compute_seconds_by_origin")  # the hosts' own, or this CPU's:
        if isinstance(self._runner, LocalCpuRunner):
            compute = {**compute, "cpu": self._runner.compute_seconds}
        return EngineSnapshot.take(self.counters, self.source.bytes_by_origin(), self.source.blob_nbytes,
                                   optional("host_status"), optional("run_seconds_by_origin"),
                                   {host: sent + received for host, (sent, received) in run_bytes.items()},
                                   {host: received for host, (_, received) in run_bytes.items()}, compute)

    def add_closer(self, closer: Callable[[], None]) -> None:
        """Something to stop when the engine closes (a local expert host, say)."""
        self._closers.append(closer)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for closer in closers:
            closer()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- generation ----------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.store.folder}: this store has no tokenizer; pass token ids")
        return list(self.tokenizer(prompt).input_ids)

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int = 64,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stop_at_eos: bool = True,
    ) -> Generation:
        """A Generation: iterate it for text pieces as tokens are made."""
        if isinstance(prompt, str) and not prompt:
            raise ConfigError("the prompt is empty")
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        total = len(prompt_ids) + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + max new tokens ({max_new_tokens}) exceed the model's "
                f"context of {self.config.max_position_embeddings}"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0-{self.config.vocab_size - 1})")
        sampling = SamplingParams(greedy=greedy, temperature=temperature, top_p=top_p, seed=seed)

        def token_loop(generation: Generation) -> Iterator[int]:
            return self._token_loop(generation, prompt_ids, max_new_tokens, sampling, stop_at_eos)

        return Generation(token_loop, self.tokenizer, stop or [])

    def generate_stream(self, prompt: str | list[int], **kwargs) -> AsyncGeneration:
        """`async for piece in engine.generate_stream(prompt, ...)`: same arguments as generate."""
        return AsyncGeneration(self.generate(prompt, **kwargs))

    def _kv_cache(self, length: int) -> KVCache:
        if self._kv is None or self._kv.capacity < length:
            capacity = min(self.config.max_position_embeddings, (length + 255) // 256 * 256)
            self._kv = self._decoder = None  # free the old ones first
            self._kv = KVCache(self.config, capacity, self.device, self.dtype)
        return self._kv

    def _prefill(self, prompt_ids: list[int], kv: KVCache) -> torch.Tensor:
        """The prompt path: logits [1, V] of the last prompt token. A long prompt goes through in
        chunks of `prompt_chunk` tokens (each attends to the KV cache of the ones before), so its
        activations' memory is bounded whatever its length (not while a routing trace is recorded or
        replayed: a trace's prompt step is the whole prompt)."""
        if self.routing_hook is not None:  # a trace's prompt step is the whole prompt: not chunked
            self.routing_hook.begin_step("prompt", prompt_ids)
        tokens = torch.tensor(prompt_ids, device=self.device)
        chunk = self.options.prompt_chunk if self.routing_hook is None else len(prompt_ids)
        for start in range(0, len(prompt_ids), chunk):
            logits = self.model.forward(tokens[start:start + chunk], start, kv)
        return logits

    def _decode_step(self, token: int, position: int, kv: KVCache) -> torch.Tensor:
        """The decode path: logits [1, V] of one new token (a static buffer: read it before the
        next step). The decoder is made once per KV cache and cache."""
        if self._decoder is None or self._decoder.kv is not kv:
            # MOE_EDGE_RESIDENT_GRAPH=0 keeps the per-layer decode path when every expert is resident
            # (a switch for comparing the two, and for ruling the one-graph token out when debugging);
            # MOE_EDGE_SLOT_KERNELS=0 keeps a graph per (layer, slot, position) where offloaded decode
            # would run the in-place slot kernels.
            self._decoder = Decoder(self.model, kv, cuda_graphs=self.options.cuda_graphs,
                                    resident_path=os.environ.get("MOE_EDGE_RESIDENT_GRAPH", "1") != "0",
                                    slot_kernels=os.environ.get("MOE_EDGE_SLOT_KERNELS", "1") != "0")
        if self.routing_hook is not None:
            self.routing_hook.begin_step("decode", [token])
        return self._decoder.step(token, position)

    def _token_loop(self, gen: Generation, prompt_ids: list[int], max_new_tokens: int,
                    sampling: SamplingParams, stop_at_eos: bool) -> Iterator[int]:
        with self._lock:
            self.cache.drop_failed_loads()  # left by a generation that ended on a source error
            sampler = Sampler(sampling)
            kv = self._kv_cache(len(prompt_ids) + max_new_tokens)
            before = self.snapshot()
            stats = gen.stats
            stats.prompt_tokens = len(prompt_ids)
            eos = self.config.eos_token_id if stop_at_eos else None
            started = time.perf_counter()
            try:
                token = sampler(self._prefill(prompt_ids, kv)[-1])
                stats.prefill_s = stats.time_to_first_token_s = time.perf_counter() - started
                position = len(prompt_ids)
                decode_started = time.perf_counter()
                gen.finish_reason = "length"
                for produced in range(1, max_new_tokens + 1):
                    stats.new_tokens = produced
                    yield token
                    if token == eos:
                        gen.finish_reason = "stop"
                        break
                    if gen.cancelled.is_set():
                        gen.finish_reason = gen.finish_reason if gen.finish_reason == "stop" else "cancelled"
                        break
                    if produced == max_new_tokens:
                        break
                    logits = self._decode_step(token, position, kv)
                    position += 1
                    token = sampler(logits[-1])
                    stats.decode_s = time.perf_counter() - decode_started
            finally:
                if stats.decode_s > 0 and stats.new_tokens > 1:
                    stats.tokens_per_s = (stats.new_tokens - 1) / stats.decode_s
                stats.record(self.snapshot().since(before))

    # --- bench's decode ------------------------------------------------------------------

    @contextmanager
    def forced_decode(self, prompt_ids: list[int], steps: int) -> Iterator["ForcedDecode"]:
        """Decode fed with given tokens instead of sampled ones (teacher forcing), through the
        same prompt and decode paths as generate: what bench times."""
        with self._lock:
            self.cache.drop_failed_loads()
            kv = self._kv_cache(len(prompt_ids) + steps + 1)
            yield ForcedDecode(self, kv, prompt_ids)


class ForcedDecode:
    def __init__(self, engine: Engine, kv: KVCache, prompt_ids: list[int]) -> None:
        self.engine, self.kv, self.prompt_ids = engine, kv, prompt_ids
        self.position = 0

    def prefill(self) -> None:
        logits = self.engine._prefill(self.prompt_ids, self.kv)
        int(logits.argmax())  # the sampler's sync, as in generate
        self.position = len(self.prompt_ids)

    def step(self, token: int) -> None:
        logits = self.engine._decode_step(token, self.position, self.kv)
        int(logits.argmax())  # the sampler's sync, as in generate; the caller gives the next token
        self.position += 1

    @property
    def decoder(self) -> Decoder:
        """The decoder in use (made by the first step): bench sets its clock."""
        return self.engine._decoder
