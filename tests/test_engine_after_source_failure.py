"""A generation that ends on an expert source error leaves no failed load behind: the next
generation on the same engine loads those experts afresh and gives the usual tokens (the server
relies on this to keep serving after a host hiccup)."""

from __future__ import annotations

import pytest

from common.errors import HostError
from common.store.reader import ExpertStore
from coordinator.engine import Engine
from coordinator.sources.local import RamSource


class SourceThatFailsOnRequest:
    failing = False

    def __init__(self, store, fetch_loop) -> None:
        self.inner = RamSource(ExpertStore(store.folder), pin=False, progress=False)
        self.name = "flaky"
        self.blob_nbytes = self.inner.blob_nbytes

    def resident_blob(self, eid):
        return None

    async def fetch_into(self, eid, out) -> None:
        if SourceThatFailsOnRequest.failing:
            raise HostError(f"10.0.0.9:50051: no answer for {eid}")
        await self.inner.fetch_into(eid, out)

    def bytes_by_origin(self) -> dict[str, int]:
        return self.inner.bytes_by_origin()

    def close(self) -> None:
        self.inner.close()


def test_the_generation_after_a_source_error_gives_the_usual_tokens(store16):
    with Engine.open(store16, device="cpu", cache_experts=2) as engine:
        reference = engine.generate("Hello world", max_new_tokens=10)
        list(reference)
    with Engine.open(store16, source=SourceThatFailsOnRequest, device="cpu", cache_experts=2) as engine:
        SourceThatFailsOnRequest.failing = True
        try:
            for prompt in ("Hello", "User: x\nAssistant:"):  # these leave a failed prefetch behind
                with pytest.raises(HostError, match="10.0.0.9:50051"):
                    list(engine.generate(prompt, max_new_tokens=3))
        finally:
            SourceThatFailsOnRequest.failing = False
        again = engine.generate("Hello world", max_new_tokens=10)
        list(again)
        assert again.token_ids == reference.token_ids
