"""Sampling is reproducible with a seed; text is streamed piece by piece as the tokenizer would
decode it whole; stop strings end the text even when split across pieces."""

import pytest
import torch

from common.errors import ConfigError
from coordinator.runtime.detokenizer import IncrementalDetokenizer, StopMatcher
from coordinator.runtime.sampler import Sampler, SamplingParams


def test_greedy_takes_the_most_likely_token():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert Sampler(SamplingParams())(logits) == 1


def test_the_same_seed_gives_the_same_samples():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(greedy=False, temperature=0.9, top_p=0.8, seed=42)
    first, second = Sampler(params), Sampler(params)
    assert [first(logits) for _ in range(20)] == [second(logits) for _ in range(20)]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    sampler = Sampler(SamplingParams(greedy=False, temperature=1.0, top_p=0.7, seed=0))
    assert {sampler(logits) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(greedy=False, **kwargs)


def test_incremental_pieces_join_to_the_whole_decode(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hello world! The experts — naïve café, 東京 — come just in time."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_string_split_across_pieces_ends_the_text():
    matcher = StopMatcher(["STOP"])
    out = "".join(matcher.feed(p) for p in ["abc S", "TO", "P and more"])
    assert matcher.stopped and out == "abc "


def test_text_that_only_looks_like_a_stop_start_is_released():
    matcher = StopMatcher(["STOP"])
    out = matcher.feed("abc ST") + matcher.feed("ART")
    assert not matcher.stopped and out + matcher.flush() == "abc START"


def test_streamed_pieces_of_any_token_sequence_join_to_the_whole_decode(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):  # random ids include lone UTF-8 continuation bytes, as sampling can give
        ids = torch.randint(3, len(tokenizer), (40,), generator=generator).tolist()
        detokenizer = IncrementalDetokenizer(tokenizer)
        text = "".join(detokenizer.add(i) for i in ids) + detokenizer.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
