"""The Python API: a plain iterator for synchronous code and `async for` for asyncio code give
the same text; leaving early stops generation."""

import asyncio

from coordinator import Engine


def test_sync_iterator_and_async_stream_give_the_same_text(store4):
    with Engine.open(store4, cache_experts=2) as engine:
        sync_generation = engine.generate("Hello world", max_new_tokens=10, stop_at_eos=False)
        sync_text = "".join(sync_generation)

        async def collect():
            stream = engine.generate_stream("Hello world", max_new_tokens=10, stop_at_eos=False)
            pieces = [piece async for piece in stream]
            return "".join(pieces), stream.token_ids

        async_text, async_ids = asyncio.run(collect())
    assert async_text == sync_text and async_ids == sync_generation.token_ids
    assert len(sync_generation.token_ids) == 10 and sync_generation.finish_reason == "length"


def test_leaving_an_async_stream_early_cancels_the_generation(store4):
    with Engine.open(store4, cache_experts=2) as engine:

        async def take_two():
            stream = engine.generate_stream("Hello world", max_new_tokens=200, stop_at_eos=False)
            taken = 0
            async for _ in stream:
                taken += 1
                if taken == 2:
                    break
            return stream

        stream = asyncio.run(take_two())
        assert stream.finish_reason == "cancelled"
        assert len(stream.token_ids) < 200
        # the engine is free again
        again = engine.generate("Hello", max_new_tokens=3, stop_at_eos=False)
        assert len(list(again)) >= 1 and len(again.token_ids) == 3


def test_seeded_sampling_repeats(store4):
    with Engine.open(store4, cache_experts=2) as engine:
        runs = []
        for _ in range(2):
            generation = engine.generate("Hello", max_new_tokens=8, greedy=False, temperature=1.5, top_p=0.9, seed=3,
                                         stop_at_eos=False)
            list(generation)
            runs.append(generation.token_ids)
    assert runs[0] == runs[1]
