"""A generation that ends on an expert source error leaves no failed load behind: the next
generation on the same engine loads those experts afresh and gives the usual tokens (the server
relies on this to keep serving after a host hiccup)."""

from __future__ import annotations

import pytest

from common.errors import HostError
from coordinator.runtime.engine import Engine
from flaky_source import FlakySource


def test_the_generation_after_a_source_error_gives_the_usual_tokens(store16):
    with Engine.open(store16, device="cpu", cache_experts=2) as engine:
        reference = engine.generate("Hello world", max_new_tokens=10)
        list(reference)
    with Engine.open(store16, source=FlakySource, device="cpu", cache_experts=2) as engine:
        FlakySource.failing = True
        try:
            for prompt in ("Hello", "User: x\nAssistant:"):  # these leave a failed prefetch behind
                with pytest.raises(HostError, match="10.0.0.9:50051"):
                    list(engine.generate(prompt, max_new_tokens=3))
        finally:
            FlakySource.failing = False
        again = engine.generate("Hello world", max_new_tokens=10)
        list(again)
        assert again.token_ids == reference.token_ids
