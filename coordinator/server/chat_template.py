"""The prompt of a chat: a list of {role, content} messages -> the text and token ids the model
continues. Knows nothing about HTTP.

With a chat template (the tokenizer's `chat_template`, as Mixtral-Instruct ships one), the
template renders the messages and the generation prompt; its text already holds the special
tokens it wants (BOS, [INST] ...), so it is tokenized without adding any, as transformers'
`apply_chat_template(tokenize=True)` does.

Without one (base models, the tiny test model), the plain fallback is one line per message,
"Role: content" with the role capitalised (System, User, Assistant), then "Assistant:" for the
model to continue:

    System: Answer briefly.
    User: Hello world
    Assistant:

That text is tokenized like any prompt (BOS added), so it gives exactly what
`python -m coordinator generate --prompt TEXT` gives for the same text."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError

FALLBACK_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    token_ids: list[int]
    templated: bool  # True: the tokenizer's chat template; False: the plain fallback


def fallback_chat_text(messages: list[dict[str, str]]) -> str:
    lines = [f"{FALLBACK_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """(the prompt's text, templated): what build_chat_prompt tokenizes. Templated text already
    holds its special tokens, so it is tokenized without adding any."""
    if tokenizer is None:
        raise ConfigError("this store has no tokenizer, so it cannot take chat messages; send token ids to /v1/completions")
    if not messages:
        raise ConfigError("messages is empty")
    unknown = [m["role"] for m in messages if m["role"] not in FALLBACK_ROLE_NAMES]
    if unknown:
        raise ConfigError(f"message role {unknown[0]!r}: choose one of {', '.join(FALLBACK_ROLE_NAMES)}")
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
        except Exception as err:  # jinja's TemplateError, or raise_exception() inside the template
            raise ConfigError(f"the model's chat template refused these messages: {err}") from None
    return fallback_chat_text(messages), False


def build_chat_prompt(tokenizer, messages: list[dict[str, str]]) -> ChatPrompt:
    """messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]."""
    text, templated = render_chat(tokenizer, messages)
    return ChatPrompt(text, list(tokenizer(text, add_special_tokens=not templated).input_ids), templated=templated)
