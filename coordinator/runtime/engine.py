"""The engine: opens a store, puts the dense weights on the device, wires the expert cache to a
source and a prefetcher, and runs the token loop (prefill, then one decode step per token).

    with Engine.open("STORE", device="cuda", cache_experts=4) as engine:
        for piece in engine.generate("Hello", max_new_tokens=32):
            print(piece, end="", flush=True)

One generation runs at a time; others wait for the engine's lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import ConfigError, StoreError
from common.store.reader import ExpertStore

from .expert_cache import ExpertCache
from .decoder import GraphedDecoder
from .expert_loader import ExpertLoader
from .fetch_loop import FetchLoop
from .kernels import quantized_linear_for
from .generation import AsyncGeneration, Generation
from .model import DenseWeights, KVCache, Transformer
from .moe import MoEBlock
from .prefetcher import RouterLookahead
from .sampler import Sampler, SamplingParams
from ..sources.base import ExpertSource
from ..sources.local import DiskSource, RamSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SourceFactory = Callable[[ExpertStore, FetchLoop], ExpertSource]


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    cache_experts: int = 2  # GPU slots per layer
    prefetch: bool = True
    prefetch_depth: int = 1  # layers ahead
    prefetch_width: int | None = None  # experts guessed per layer ahead; default: the model's top-k
    source: str = "ram"  # ram | disk (or a SourceFactory given to Engine.open)
    fused_kernels: bool = True  # Triton dequantize+matmul on CUDA (ignored elsewhere)
    cuda_graphs: bool = True  # decode steps as CUDA graphs (ignored off CUDA)
    progress: bool = False


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"--device {name}: choose cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
        self.options = options
        self.config = store.config
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if options.prefetch_depth < 1:
            raise ConfigError(f"--prefetch-depth {options.prefetch_depth}: must be at least 1")
        self._closers: list[Callable[[], None]] = []
        self.fetch_loop = FetchLoop()
        self._closers.append(self.fetch_loop.close)
        try:
            self.source = self._make_source(source)
            self._closers.insert(0, self.source.close)
            self.tokenizer = load_tokenizer(store.folder)
            dense = DenseWeights.from_store_tensors(
                store.load_dense(), self.config, store.manifest.dense_quant, self.device, self.dtype
            )
            self.loader = ExpertLoader(self.source, self.device, self.fetch_loop)
            self.cache = ExpertCache(
                layout=store.layout,
                num_layers=self.config.num_layers,
                slots_per_layer=options.cache_experts,
                device=self.device,
                loader=self.loader,
            )
            routers = [layer.router for layer in dense.layers]
            norms = [layer.post_attention_norm for layer in dense.layers]
            predictor = None
            if options.prefetch:
                width = options.prefetch_width or self.config.top_k
                predictor = RouterLookahead(routers, norms, self.config.rms_norm_eps,
                                            depth=options.prefetch_depth, experts_per_layer=min(width, self.config.num_experts))
            moe = MoEBlock(self.config, routers, norms, self.cache, predictor,
                           quantized_linear_for(self.device, fused=options.fused_kernels))
            self.model = Transformer(self.config, dense, moe, self.device, self.dtype)
        except BaseException:
            self.close()
            raise
        self._kv: KVCache | None = None
        self._decoder: GraphedDecoder | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, store: str | Path, *, source: str | SourceFactory = "ram", **options) -> "Engine":
        """Open a packed store. Options are EngineOptions' fields (device, dtype, cache_experts,
        prefetch, prefetch_depth, prefetch_width, fused_kernels, cuda_graphs, progress)."""
        if options.get("cache_experts", 1) < 1:
            raise ConfigError(f"--cache-experts {options['cache_experts']}: needs at least 1 slot per layer")
        local = isinstance(source, str)  # remote sources need no expert files here
        return cls(ExpertStore(store, with_experts=local), EngineOptions(source=source if isinstance(source, str) else "custom", **options), source)

    def _make_source(self, source: str | SourceFactory) -> ExpertSource:
        if callable(source):
            return source(self.store, self.fetch_loop)
        if source == "ram":
            return RamSource(self.store, pin=self.device.type == "cuda", progress=self.options.progress)
        if source == "disk":
            return DiskSource(self.store)
        raise ConfigError(f"--source {source}: choose ram or disk")

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

    def _decode_step(self, token: int, position: int, kv: KVCache, step_input: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] of one new token: through CUDA graphs where they apply, else eagerly."""
        if self.device.type == "cuda" and self.options.cuda_graphs:
            if self._decoder is None or self._decoder.kv is not kv:
                self._decoder = GraphedDecoder(self.model, kv)
            return self._decoder.step(token, position)
        step_input.fill_(token)
        return self.model.forward(step_input, position, kv)

    def _token_loop(self, gen: Generation, prompt_ids: list[int], max_new_tokens: int,
                    sampling: SamplingParams, stop_at_eos: bool) -> Iterator[int]:
        with self._lock:
            self.cache.drop_failed_loads()  # left by a generation that ended on a source error
            sampler = Sampler(sampling)
            kv = self._kv_cache(len(prompt_ids) + max_new_tokens)
            before = self.cache.counters.totals()
            sources_before = dict(self.source.bytes_by_origin())
            stats = gen.stats
            stats.prompt_tokens = len(prompt_ids)
            eos = self.config.eos_token_id if stop_at_eos else None
            started = time.perf_counter()
            try:
                logits = self.model.forward(torch.tensor(prompt_ids, device=self.device), 0, kv)
                token = sampler(logits[-1])
                stats.prefill_s = stats.time_to_first_token_s = time.perf_counter() - started
                position = len(prompt_ids)
                decode_started = time.perf_counter()
                gen.finish_reason = "length"
                step_input = torch.empty(1, dtype=torch.long, device=self.device)
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
                    logits = self._decode_step(token, position, kv, step_input)
                    position += 1
                    token = sampler(logits[-1])
                    stats.decode_s = time.perf_counter() - decode_started
            finally:
                if stats.decode_s > 0 and stats.new_tokens > 1:
                    stats.tokens_per_s = (stats.new_tokens - 1) / stats.decode_s
                after = self.cache.counters.totals()
                for key in ("cache_hits", "cache_misses", "prefetch_hits", "prefetch_issued", "prefetch_wasted", "bytes_fetched", "wait_s"):
                    setattr(stats, key, type(getattr(stats, key))(after[key] - before[key]))
                stats.bytes_by_source = {
                    origin: count - sources_before.get(origin, 0)
                    for origin, count in self.source.bytes_by_origin().items()
                }
                stats.fetches_by_source = {origin: count // self.source.blob_nbytes for origin, count in stats.bytes_by_source.items()}
