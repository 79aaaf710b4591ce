"""The reply bodies of the OpenAI API: whole replies, stream chunks and errors, as plain dicts.
Knows nothing about the engine or HTTP.

A streamed reply is a run of server-sent events, `data: {chunk}\\n\\n`, ending with
`data: [DONE]\\n\\n`. Completion chunks carry `choices[0].text`; chat chunks carry
`choices[0].delta` (the role first, then content pieces, then an empty delta with the
finish_reason). With `stream_options.include_usage`, one last chunk with empty choices carries
the usage."""

from __future__ import annotations

import json
import time
import uuid

DONE_EVENT = "data: [DONE]\n\n"


def server_sent_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionFormat:
    """POST /v1/completions replies (object "text_completion")."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _reply(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def opening(self) -> list[dict]:
        return []

    def piece(self, text: str) -> dict:
        return self._reply([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def closing(self, finish_reason: str) -> dict:
        return self._reply([{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, counts: dict) -> dict:
        return self._reply([], usage=counts)

    def whole(self, text: str, finish_reason: str, counts: dict) -> dict:
        return self._reply([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}], usage=counts)


class ChatFormat:
    """POST /v1/chat/completions replies (objects "chat.completion" and "chat.completion.chunk")."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _chunk(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _delta(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def opening(self) -> list[dict]:
        return [self._delta({"role": "assistant", "content": ""})]

    def piece(self, text: str) -> dict:
        return self._delta({"content": text})

    def closing(self, finish_reason: str) -> dict:
        return self._delta({}, finish_reason)

    def usage_chunk(self, counts: dict) -> dict:
        return self._chunk([], usage=counts)

    def whole(self, text: str, finish_reason: str, counts: dict) -> dict:
        message = {"role": "assistant", "content": text}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
                "usage": counts}
