"""One generation request as the user sees it: an iterator of text pieces (sync), or an async
iterator of the same pieces that never blocks the caller's event loop; afterwards its
token_ids, text, finish_reason and stats."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from .counters import EngineSnapshot
from .detokenizer import IncrementalDetokenizer, StopMatcher


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    tokens_per_s: float = 0.0  # decode steps per second, after the first token
    cache_hits: int = 0
    cache_misses: int = 0
    prefetch_hits: int = 0
    prefetch_issued: int = 0
    prefetch_wasted: int = 0
    prefetch_left: int = 0  # guesses placement auto did not copy: their uses run where they live
    bytes_fetched: int = 0
    experts_run_elsewhere: int = 0  # uses that placement ran where the expert lives
    wait_s: float = 0.0  # time the token loop waited on expert loads
    run_wait_s: float = 0.0  # time it waited on experts run where they live, after the device's
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    fetches_by_source: dict[str, int] = field(default_factory=dict)  # experts delivered (one blob each)
    run_seconds_by_source: dict[str, float] = field(default_factory=dict)  # waiting on hosts running experts
    run_bytes_by_source: dict[str, int] = field(default_factory=dict)  # what those calls sent and received

    def record(self, delta: EngineSnapshot) -> None:
        """Take the engine's counts of this generation (a later snapshot minus an earlier one)."""
        self.cache_hits = delta.total("hits")
        self.cache_misses = delta.total("misses")
        self.prefetch_hits = delta.total("prefetch_hits")
        self.prefetch_issued = delta.total("prefetch_issued")
        self.prefetch_wasted = delta.total("prefetch_wasted")
        self.prefetch_left = delta.total("prefetch_left")
        self.bytes_fetched = delta.total("bytes_fetched")
        self.experts_run_elsewhere = delta.total("runs_elsewhere")
        self.wait_s = delta.wait_s
        self.run_wait_s = delta.run_wait_s
        self.bytes_by_source = delta.bytes_by_source
        self.fetches_by_source = delta.fetches_by_source
        self.run_seconds_by_source = delta.run_seconds_by_source
        self.run_bytes_by_source = delta.run_bytes_by_source

    def to_dict(self) -> dict:
        return asdict(self)


class Generation:
    """Iterate for text pieces. `token_ids` holds the new tokens only."""

    def __init__(self, token_loop: Callable[["Generation"], Iterator[int]], tokenizer, stop: list[str]) -> None:
        self._token_loop = token_loop
        self._detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self._stop = StopMatcher(stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
        self.stats = GenerationStats()
        self.cancelled = threading.Event()
        self._started = False

    def cancel(self) -> None:
        """Stop after the current token (safe from any thread)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        for token in self._token_loop(self):
            self.token_ids.append(token)
            piece = self._detokenizer.add(token) if self._detokenizer is not None else ""
            piece = self._stop.feed(piece)
            if piece:
                self.text += piece
                yield piece
            if self._stop.stopped:
                self.finish_reason = "stop"
                self.cancel()
        if self._detokenizer is not None and not self._stop.stopped:
            held = self._stop.feed(self._detokenizer.flush())
            if held:
                self.text += held
                yield held
        tail = "" if self._stop.stopped else self._stop.flush()
        if tail:
            self.text += tail
            yield tail


_END = object()


class AsyncGeneration:
    """`async for piece in engine.generate_stream(...)`: the token loop runs in a worker thread;
    leaving the loop early (or cancelling the task) stops generation after the current token."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    def __getattr__(self, name: str):
        return getattr(self.generation, name)

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def run() -> None:
            try:
                for piece in self.generation:
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as err:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, err)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        worker = threading.Thread(target=run, name="moe-edge-generate", daemon=True)
        worker.start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.generation.cancel()
            await asyncio.to_thread(worker.join)
