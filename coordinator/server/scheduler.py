"""Whose turn it is to generate. The engine has one KV cache, so one request generates at a time;
the others wait in arrival order in a bounded queue, and a request past the bound is refused at
once. Knows nothing about HTTP or the engine: it hands out turns on one asyncio event loop.

    turn = queue.reserve()      # QueueFullError when 1 generating + max_waiting waiting
    async with turn:            # waits for the turn; leaving (or turn.close()) frees it
        ...generate...
"""

from __future__ import annotations

import asyncio
import time

from common.errors import ConfigError, QueueFullError


class GenerationQueue:
    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ConfigError(f"--max-queue {max_waiting}: must be 0 or more")
        self.max_waiting = max_waiting
        self.waiting = 0  # reserved turns not yet generating
        self.generating = 0  # 0 or 1
        self._lock = asyncio.Lock()  # FIFO: asyncio wakes waiters in arrival order

    def reserve(self) -> "Turn":
        """A place in the line, or QueueFullError. Does not wait."""
        if self.generating + self.waiting >= 1 + self.max_waiting:
            raise QueueFullError(
                f"the server is busy: one request is generating and {self.waiting} are waiting, "
                f"the most it queues (--max-queue {self.max_waiting}); retry later"
            )
        self.waiting += 1
        return Turn(self)


class Turn:
    """One request's place: reserved, then generating, then closed. close() is idempotent and
    frees the place whatever state it is in."""

    def __init__(self, queue: GenerationQueue) -> None:
        self._queue = queue
        self._state = "reserved"
        self._reserved_at = time.perf_counter()
        self.waited_s = 0.0

    async def __aenter__(self) -> "Turn":
        if self._state != "reserved":
            raise RuntimeError(f"a turn can be entered once (this one is {self._state})")
        try:
            await self._queue._lock.acquire()
        except BaseException:
            self.close()
            raise
        self._queue.waiting -= 1
        self._queue.generating = 1
        self._state = "generating"
        self.waited_s = time.perf_counter() - self._reserved_at
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._state == "reserved":
            self._queue.waiting -= 1
        elif self._state == "generating":
            self._queue.generating = 0
            self._queue._lock.release()
        self._state = "closed"
