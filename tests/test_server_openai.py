"""The official `openai` package talks to the server: streamed and whole replies agree with each
other and with `python -m coordinator generate --greedy`; chat prompts come from the tokenizer's
chat template when it has one, else from the documented plain fallback."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from http_server_fixtures import MODEL_NAME, running_server

from conftest import coordinator_cli
from coordinator.server.chat_template import fallback_chat_text

MESSAGES = [{"role": "user", "content": "Hello world"}]
TOKENS = 24


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def sdk(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", timeout=60, max_retries=0)
    yield client
    client.close()


def streamed_chat(sdk, **kwargs) -> list[str]:
    stream = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, stream=True, **kwargs)
    return [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]


def test_streamed_chat_arrives_in_several_chunks_that_join_to_the_non_streamed_answer(sdk):
    pieces = streamed_chat(sdk, max_tokens=TOKENS, temperature=0, seed=0)
    whole = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=TOKENS, temperature=0, seed=0)
    assert len(pieces) >= 5
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == TOKENS
    assert whole.model == MODEL_NAME


def test_streamed_chat_and_completion_equal_generate_greedy_for_the_same_prompt(sdk, store16):
    prompt = fallback_chat_text(MESSAGES)
    assert prompt == "User: Hello world\nAssistant:"  # the documented fallback (no chat template here)
    result = coordinator_cli("generate", "--store", store16, "--prompt", prompt, "--max-new-tokens", TOKENS,
                             "--greedy", "--json", "--cache-experts", 2)
    assert result.returncode == 0, result.stderr
    reference = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(reference["token_ids"]) == TOKENS

    chat = "".join(streamed_chat(sdk, max_tokens=TOKENS, temperature=0))
    completion_stream = sdk.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True)
    completion = "".join(chunk.choices[0].text for chunk in completion_stream if chunk.choices)
    assert chat == reference["text"]
    assert completion == reference["text"]


def test_seeded_sampling_streams_the_same_text_as_the_non_streamed_reply(sdk):
    settings = dict(max_tokens=TOKENS, temperature=0.9, top_p=0.95, seed=1234)
    pieces = streamed_chat(sdk, **settings)
    whole = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **settings)
    assert len(pieces) >= 2
    assert "".join(pieces) == whole.choices[0].message.content


def test_a_stop_string_ends_the_reply_before_it(sdk):
    reference = sdk.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=TOKENS, temperature=0).choices[0].text
    stop = reference[len(reference) // 2 :][:3]
    cut = reference.index(stop)
    reply = sdk.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=TOKENS, temperature=0, stop=[stop, "never"])
    assert reply.choices[0].text == reference[:cut]
    assert reply.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in sdk.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=TOKENS,
                                                                 temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == reference[:cut]


def test_usage_counts_prompt_and_completion_tokens_streamed_or_not(sdk, server):
    prompt_ids = server.engine.encode("Hello world")
    whole = sdk.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=5, temperature=0)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (len(prompt_ids), 5, len(prompt_ids) + 5)
    chunks = list(sdk.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text  # token ids as the prompt


def test_models_lists_the_served_model_and_health_answers(sdk, server):
    import httpx

    assert [m.id for m in sdk.models.list().data] == [MODEL_NAME]
    assert sdk.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("some-other-model")
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME and health["queue_length"] == 0


MIXTRAL_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def test_chat_uses_the_tokenizers_chat_template_when_it_has_one(store16, tmp_path):
    store = tmp_path / "store-with-template"
    shutil.copytree(store16, store)
    (store / "chat_template.jinja").write_text(MIXTRAL_STYLE_TEMPLATE)
    with running_server(store) as server:
        tokenizer = server.engine.tokenizer
        assert tokenizer.chat_template == MIXTRAL_STYLE_TEMPLATE
        expected_ids = list(tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"])
        assert expected_ids.count(1) == 1  # one BOS: the template's, none added on top
        with openai.OpenAI(base_url=server.v1, api_key="unused", timeout=60, max_retries=0) as sdk:
            chat = sdk.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
            completion = sdk.completions.create(model=MODEL_NAME, prompt=expected_ids, max_tokens=12, temperature=0)
            assert chat.usage.prompt_tokens == len(expected_ids)
            assert chat.choices[0].message.content == completion.choices[0].text
            with pytest.raises(openai.BadRequestError, match="Only user and assistant roles"):
                sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "system", "content": "x"}], max_tokens=2)
