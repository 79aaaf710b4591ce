"""Chat messages -> prompt: the tokenizer's chat template when it has one (tokenized as
transformers does, no second BOS), else the documented plain fallback."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from coordinator.server.chat_template import build_chat_prompt, fallback_chat_text
from coordinator.tools.tiny_model import build_tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_fallback_prompt_is_one_role_line_per_message_then_assistant():
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"}]
    assert fallback_chat_text(messages) == "System: Answer briefly.\nUser: Hi\nAssistant: Hello.\nUser: How are you?\nAssistant:"


def test_without_a_template_the_fallback_text_is_tokenized_like_any_prompt(tokenizer):
    messages = [{"role": "user", "content": "Hello world"}]
    prompt = build_chat_prompt(tokenizer, messages)
    assert not prompt.templated
    assert prompt.text == "User: Hello world\nAssistant:"
    assert prompt.token_ids == list(tokenizer("User: Hello world\nAssistant:").input_ids)


def test_a_chat_template_gives_the_token_ids_of_transformers_apply_chat_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "More"}]
    prompt = build_chat_prompt(tokenizer, messages)
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert prompt.templated
    assert prompt.text.startswith("<s>[INST] Hello [/INST]Hi</s>")
    assert prompt.token_ids == list(expected)
    assert prompt.token_ids.count(tokenizer.bos_token_id) == 1


def test_a_template_that_refuses_the_messages_is_a_config_error():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    with pytest.raises(ConfigError, match="Only user and assistant roles"):
        build_chat_prompt(tokenizer, [{"role": "system", "content": "x"}])


def test_no_tokenizer_or_no_messages_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="no tokenizer"):
        build_chat_prompt(None, [{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="empty"):
        build_chat_prompt(tokenizer, [])
