"""The generation queue alone (no HTTP, no engine): one turn at a time, in arrival order, a
bound past which reservations are refused, and places freed by whoever leaves."""

from __future__ import annotations

import asyncio

import pytest

from common.errors import ConfigError, QueueFullError
from coordinator.server.scheduler import GenerationQueue


async def test_turns_run_one_at_a_time_in_arrival_order():
    queue = GenerationQueue(max_waiting=5)
    order: list[int] = []
    running = 0

    async def request(number: int) -> None:
        nonlocal running
        async with queue.reserve():
            running += 1
            assert running == 1
            order.append(number)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(6))), timeout=10)
    assert order == list(range(6))
    assert (queue.waiting, queue.generating) == (0, 0)


async def test_reserving_past_the_bound_raises_queue_full_with_the_bound_in_the_message():
    queue = GenerationQueue(max_waiting=1)
    first, second = queue.reserve(), queue.reserve()  # one will generate, one waits
    with pytest.raises(QueueFullError, match="--max-queue 1"):
        queue.reserve()
    first.close()
    third = queue.reserve()  # a place came free
    for turn in (second, third):
        turn.close()
    assert queue.waiting == 0


async def test_a_waiting_turn_that_is_cancelled_frees_its_place():
    queue = GenerationQueue(max_waiting=1)
    holder = queue.reserve()
    await holder.__aenter__()
    waiter = queue.reserve()

    async def wait() -> None:
        async with waiter:
            pass

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    assert queue.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.waiting == 0
    await holder.__aexit__(None, None, None)
    async with queue.reserve():  # the queue still works
        assert queue.generating == 1
    assert queue.generating == 0


async def test_close_frees_a_place_once_whatever_the_state():
    queue = GenerationQueue(max_waiting=0)
    turn = queue.reserve()
    turn.close()
    turn.close()
    assert queue.waiting == 0
    async with queue.reserve() as generating:
        generating.close()  # closed while generating: frees the lock once
        assert queue.generating == 0
    async with queue.reserve():
        pass


def test_a_negative_bound_is_a_config_error():
    with pytest.raises(ConfigError, match="--max-queue"):
        GenerationQueue(max_waiting=-1)
