"""EngineOptions' defaults that depend on other options: the lookahead's depth by placement."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.errors import ConfigError
from coordinator.runtime.engine_options import AUTO_PREFETCH_DEPTH, EngineOptions


def test_the_lookahead_guesses_one_layer_ahead_and_two_under_placement_auto_unless_told():
    assert EngineOptions().depth == 1 and EngineOptions(placement="run").depth == 1
    assert EngineOptions(placement="auto").depth == AUTO_PREFETCH_DEPTH == 2
    assert EngineOptions(placement="auto", prefetch_depth=1).depth == 1
    assert EngineOptions(prefetch_depth=3).depth == 3


def test_the_depth_is_clamped_to_the_layers_that_follow_once_the_model_is_known():
    two_layers = SimpleNamespace(num_experts=8, top_k=2, num_layers=2)
    assert EngineOptions(placement="auto").for_model(two_layers).depth == 1
    assert EngineOptions(prefetch_depth=5).for_model(SimpleNamespace(num_experts=8, top_k=2, num_layers=4)).depth == 3


def test_a_depth_under_one_is_refused_by_its_flag():
    with pytest.raises(ConfigError, match="--prefetch-depth 0"):
        EngineOptions(prefetch_depth=0)
