"""The request bodies of the OpenAI API that we accept, as pydantic models that check every field.
A value out of range, a wrong type or a feature we do not offer fails validation with a message
naming the field (the app turns that into a 400 in the OpenAI error format).

Unknown fields are ignored, as OpenAI clients send some we have no use for (`user`, say). Fields
that would change the answer and that we do not implement (n > 1, logprobs, echo, penalties) are
refused rather than silently ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 8


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What both endpoints share. temperature 0 means greedy (top_p then has no effect)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None  # any integer: SamplingParams reduces it modulo 2**64
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_means_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value):
        if value != 1:
            raise ValueError("this server makes one choice per request (n must be 1)")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value not in (0, None):
            raise ValueError("penalties are not implemented here; send 0 or leave it out")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> dict:
        """The sampling keyword arguments of Engine.generate."""
        greedy = self.temperature == 0
        return {
            "greedy": greedy,
            "temperature": 1.0 if greedy else self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop_strings(),
        }

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. One prompt: a string, a list of one string, or token ids."""

    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("the prompt is empty")
            if isinstance(value[0], str) and len(value) != 1:
                raise ValueError("one prompt per request (got a list of several)")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not implemented here; leave it out")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value is not None:
            raise ValueError("logprobs are not implemented here; leave it out")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value):
        if value not in (None, 1):
            raise ValueError("best_of must be 1 here")
        return value

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        """{"role", "content"} with the content as one string; "developer" is OpenAI's newer name
        for "system"."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name of max_tokens
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not implemented here; leave it out")
        return value

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
