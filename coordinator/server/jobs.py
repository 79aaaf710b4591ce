"""A request's generation, as the HTTP layer drives it. Knows nothing about HTTP or the OpenAI
format: it turns a prompt and sampling settings into a Job whose text pieces can be awaited.

`Jobs.start` takes a place in the queue at once, then has the prompt tokenized (off the event
loop, by the caller's PromptTokenizer) and checks everything, so a full queue or a bad prompt is
refused before any response starts. The Job then runs in a task of its own: it waits
for its turn, runs `engine.generate_stream` (the token loop runs in a worker thread; the event
loop never blocks) and hands the pieces over through an asyncio queue.

Why a task of its own: when a client goes away, its handler is cancelled and calls close(). The
Job then stops the engine after the current token (or leaves the line if it was still waiting),
and frees its turn only once the engine's worker has stopped, so the next request never runs
beside the last one's final token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from common.errors import ConfigError

from .metrics import ServerMetrics
from .scheduler import GenerationQueue, Turn

_END = object()


class Jobs:
    def __init__(self, engine, queue: GenerationQueue, metrics: ServerMetrics, *, default_max_tokens: int) -> None:
        if default_max_tokens < 1:
            raise ConfigError(f"--default-max-tokens {default_max_tokens}: must be at least 1")
        self.engine = engine
        self.queue = queue
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self._running: set[asyncio.Task] = set()

    async def start(self, prompt: Callable[[], Awaitable[list[int]]] | list[int], *, endpoint: str,
                    max_tokens: int | None, sampling: dict) -> "Job":
        """Queue, validate and start. prompt: token ids, or a coroutine function giving them (a
        PromptTokenizer's, off the event loop). The place in the queue is taken first, so a full
        queue refuses a request before its prompt is tokenized. Raises ConfigError (bad prompt or
        settings) or QueueFullError; call from the event loop. sampling: greedy, temperature,
        top_p, seed, stop."""
        turn = self.queue.reserve()
        try:
            prompt_ids = list(prompt) if isinstance(prompt, list) else await prompt()
            if max_tokens is None:  # as much as asked by default, within the context
                room = self.engine.config.max_position_embeddings - len(prompt_ids)
                if room < 1:
                    raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) fills the model's context of "
                                      f"{self.engine.config.max_position_embeddings}")
                max_tokens = min(self.default_max_tokens, room)
            generation = self.engine.generate_stream(prompt_ids, max_new_tokens=max_tokens, **sampling)
        except BaseException:
            turn.close()
            raise
        job = Job(generation, turn, self.metrics, endpoint, len(prompt_ids))
        self._running.add(job._task)
        job._task.add_done_callback(self._running.discard)
        return job


class Job:
    def __init__(self, generation, turn: Turn, metrics: ServerMetrics, endpoint: str, prompt_tokens: int) -> None:
        self.generation = generation  # an AsyncGeneration
        self.endpoint = endpoint
        self.prompt_tokens = prompt_tokens
        self._turn = turn
        self._metrics = metrics
        self._out: asyncio.Queue = asyncio.Queue()
        self._generating = False
        self._delivered_all = False
        self._failed = False
        self._closed = False
        self._task = asyncio.create_task(self._drive(), name=f"moe-edge {endpoint}")

    @property
    def finish_reason(self) -> str | None:
        """"stop" (EOS or a stop string) or "length" once all pieces are delivered."""
        return self.generation.finish_reason

    @property
    def completion_tokens(self) -> int:
        return self.generation.stats.new_tokens

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces as they come; raises what the generation raised."""
        while (item := await self._out.get()) is not _END:
            if isinstance(item, BaseException):
                self._failed = True
                raise item
            yield item
        self._delivered_all = True

    def close(self) -> None:
        """Always call when done (idempotent). Before the last piece was taken, this means the
        client went away: stop generating after the current token, or leave the line."""
        if self._closed:
            return
        self._closed = True
        if self._failed:
            outcome = "error"
        elif self._delivered_all:
            outcome = "completed"
        else:
            outcome = "client_disconnected"
            self.generation.cancel()
            if not self._generating:
                self._task.cancel()
        self._metrics.count_request(self.endpoint, outcome)

    async def _drive(self) -> None:
        stats = self.generation.stats
        counted = 0
        try:
            async with self._turn:
                self._generating = True
                self._metrics.queue_wait.observe(self._turn.waited_s)
                try:
                    async with aclosing(self.generation.__aiter__()) as pieces:
                        async for piece in pieces:
                            self._metrics.tokens_generated.inc(stats.new_tokens - counted)
                            counted = stats.new_tokens
                            self._out.put_nowait(piece)
                finally:  # the engine's worker has stopped here
                    self._count_finished(stats, counted)
        except asyncio.CancelledError:
            pass  # left the line before its turn (close()); nobody reads the pieces any more
        except BaseException as err:  # handed to the reader, raised there
            self._out.put_nowait(err)
        finally:
            self._out.put_nowait(_END)

    def _count_finished(self, stats, counted: int) -> None:
        metrics = self._metrics
        metrics.tokens_generated.inc(stats.new_tokens - counted)
        metrics.prompt_tokens.inc(stats.prompt_tokens)
        if stats.new_tokens >= 1:
            metrics.time_to_first_token.observe(self._turn.waited_s + stats.time_to_first_token_s)
        metrics.decode_seconds.inc(stats.decode_s)
        if stats.tokens_per_s > 0:
            metrics.tokens_per_second.set(stats.tokens_per_s)
