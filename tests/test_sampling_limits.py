"""Every sampling setting in its allowed range samples (no overflow, no NaN, no traceback), and
every one out of range is refused with a ConfigError naming it: by SamplingParams, by the Python
API and by `generate` on the command line (one line, exit 2)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import coordinator_cli
import torch

from common.errors import ConfigError
from coordinator.runtime.sampler import GREEDY_BELOW_TEMPERATURE, Sampler, SamplingParams

# a spread like a real model's: one clear winner, a long tail, a few impossible tokens
LOGITS = torch.cat([torch.tensor([40.0, 39.5, -1e4]), torch.randn(997, generator=torch.Generator().manual_seed(0)) * 8])


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6, GREEDY_BELOW_TEMPERATURE, 1e-3, 0.5, 1.0, 2.0, 100.0, 1e30])
@pytest.mark.parametrize("top_p", [1e-9, 0.5, 1.0])
def test_any_temperature_in_range_gives_a_token_without_overflow(temperature, top_p):
    sampler = Sampler(SamplingParams(greedy=False, temperature=temperature, top_p=top_p, seed=1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tokens = [sampler(LOGITS.to(dtype)) for _ in range(5)]
        assert all(0 <= t < len(LOGITS) for t in tokens)


def test_a_temperature_below_the_threshold_is_greedy():
    tiny = Sampler(SamplingParams(greedy=False, temperature=1e-40, seed=1))
    assert not tiny.params.samples
    assert {tiny(LOGITS) for _ in range(20)} == {0}
    assert Sampler(SamplingParams(greedy=False, temperature=GREEDY_BELOW_TEMPERATURE, seed=1)).params.samples


def test_a_temperature_at_the_threshold_still_prefers_the_top_token_by_far():
    sampler = Sampler(SamplingParams(greedy=False, temperature=GREEDY_BELOW_TEMPERATURE, seed=1))
    assert {sampler(LOGITS) for _ in range(20)} == {0}


@pytest.mark.parametrize("seed", [2**70, -(2**70), 2**64, -1, 10**400])
def test_any_integer_seed_is_reduced_to_64_bits(seed):
    params = SamplingParams(greedy=False, temperature=1.0, seed=seed)
    assert params.generator_seed == seed % 2**64
    assert Sampler(params)(LOGITS) >= 0


def test_seeds_equal_modulo_2_to_the_64_sample_the_same():
    first = Sampler(SamplingParams(greedy=False, temperature=3.0, seed=2**70 + 5))
    second = Sampler(SamplingParams(greedy=False, temperature=3.0, seed=5))
    assert [first(LOGITS) for _ in range(20)] == [second(LOGITS) for _ in range(20)]


@pytest.mark.parametrize("kwargs, named", [
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1e-40}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"temperature": "1.0"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.0000001}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_p": -math.inf}, "top_p"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
])
def test_out_of_range_settings_are_refused_naming_the_setting(kwargs, named):
    with pytest.raises(ConfigError, match=f"^{named} "):
        SamplingParams(greedy=False, **kwargs)


@pytest.mark.parametrize("kwargs", [{"top_p": 0.0}, {"temperature": math.nan}, {"temperature": -1.0}, {"seed": 0.5}])
def test_greedy_refuses_settings_that_are_never_valid(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(greedy=True, **kwargs)


def test_greedy_takes_temperature_zero():
    assert not SamplingParams(greedy=True, temperature=0).samples


def test_as_options_names_the_settings_as_the_command_line_spells_them():
    with pytest.raises(ConfigError, match="^--top-p 0"):
        SamplingParams(top_p=0, as_options=True)


# --- the Python API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(store16):
    from coordinator.runtime.engine import Engine

    with Engine.open(store16, source="ram", device="cpu", cache_experts=2) as engine:
        yield engine


def test_the_api_at_temperature_1e_minus_40_gives_the_greedy_tokens(engine):
    greedy = engine.generate("Hello world", max_new_tokens=6)
    list(greedy)
    tiny = engine.generate("Hello world", max_new_tokens=6, greedy=False, temperature=1e-40, seed=2**70)
    list(tiny)
    assert tiny.token_ids == greedy.token_ids


@pytest.mark.parametrize("kwargs, named", [
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": 0.5}, "seed"),
])
def test_the_api_refuses_out_of_range_settings_with_config_error(engine, kwargs, named):
    with pytest.raises(ConfigError, match=f"^{named} "):
        engine.generate("Hello", max_new_tokens=2, greedy=False, **{"temperature": 1.0, **kwargs})


# --- the command line -----------------------------------------------------------------------


def _generate(store, *extra):
    return coordinator_cli("generate", "--store", store, "--prompt", "Hello world", "--max-new-tokens", "6",
                           "--cache-experts", "2", "--json", *extra)


def _token_ids(result) -> list[int]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["token_ids"]


def test_generate_at_temperature_1e_minus_40_prints_the_greedy_tokens(store16):
    greedy = _token_ids(_generate(store16))
    assert _token_ids(_generate(store16, "--temperature", "1e-40")) == greedy


def test_generate_takes_a_seed_beyond_64_bits(store16):
    big = _token_ids(_generate(store16, "--temperature", "1.5", "--seed", str(2**70 + 9)))
    assert big == _token_ids(_generate(store16, "--temperature", "1.5", "--seed", "9"))


@pytest.mark.parametrize("extra, named", [
    (("--temperature", "inf"), "--temperature inf"),
    (("--temperature", "nan"), "--temperature nan"),
    (("--temperature", "0"), "--temperature 0"),
    (("--temperature", "-1"), "--temperature -1"),
    (("--top-p", "0"), "--top-p 0"),
    (("--top-p", "1.5"), "--top-p 1.5"),
    (("--max-new-tokens", "0"), "--max-new-tokens 0"),
])
def test_generate_refuses_a_bad_setting_in_one_line_with_exit_2(store16, extra, named):
    result = coordinator_cli("generate", "--store", store16, "--prompt", "Hello", *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_prompt_is_refused_by_the_api_and_the_cli(store16):
    from coordinator.runtime.engine import Engine

    with Engine.open(store16, cache_experts=2) as engine:
        with pytest.raises(ConfigError, match="the prompt is empty"):
            engine.generate("")
        with pytest.raises(ConfigError, match="the prompt is empty"):
            engine.generate([])
    result = coordinator_cli("generate", "--store", store16, "--prompt", "")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["error: the prompt is empty"]
