"""A request's prompt -> token ids, off the event loop. Knows nothing about HTTP.

Tokenizing (and rendering a chat template) takes seconds for a multi-megabyte prompt; on the
event loop that would freeze every client and /health meanwhile. So it runs in one worker
thread of its own: prompts are tokenized one at a time (a tokenizer is not made to be used by
several threads at once), and never on the loop.

A prompt far longer than the model's context is refused early: when the text has more than
PROBE_CHARS_PER_TOKEN characters per token of context, its beginning alone is tokenized first,
and if that already fills the context the prompt is refused without tokenizing the rest. Why:
even in a thread, tokenizing a 4 MiB text takes seconds of CPU and about 0.5 GB, and handing its
million ids to Python holds the GIL for a few hundred milliseconds at the end (measured with the
tiny test model's tokenizer: /health stalled 0.45 s). Text with more characters per token than
that (long runs of one character, say) is tokenized whole, as before."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common.errors import ConfigError

from .chat_template import render_chat

PROBE_CHARS_PER_TOKEN = 8
# the beginning of a text is tokenized a little differently where it was cut: a margin of tokens
# makes sure the whole text is longer than the context, not just its cut beginning
PROBE_MARGIN_TOKENS = 64


class PromptTokenizer:
    def __init__(self, tokenizer, *, context: int) -> None:
        self.tokenizer = tokenizer
        self.context = context  # the model's max_position_embeddings
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-edge-tokenizer")

    async def text(self, prompt: str) -> list[int]:
        """A completion's prompt, as Engine.encode tokenizes it (special tokens added)."""
        if self.tokenizer is None:
            raise ConfigError("this store has no tokenizer; send the prompt as token ids")
        if not prompt:  # as Engine.generate refuses it: the tokenizer would hand back a lone BOS
            raise ConfigError("the prompt is empty")
        return await self._off_the_loop(self._encode, prompt, True)

    async def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A chat's prompt, as chat_template.build_chat_prompt makes it."""
        return await self._off_the_loop(self._encode_chat, messages)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _off_the_loop(self, work, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text, templated = render_chat(self.tokenizer, messages)
        return self._encode(text, not templated)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        probe = PROBE_CHARS_PER_TOKEN * self.context
        if len(text) > probe:
            cut = text.rfind(" ", probe // 2, probe)  # at a word's start where there is one
            beginning = text[: cut if cut > 0 else probe]
            count = len(self.tokenizer(beginning, add_special_tokens=add_special_tokens).input_ids)
            if count >= self.context + PROBE_MARGIN_TOKENS:
                raise ConfigError(f"the prompt is longer than the model's context of {self.context} tokens "
                                  f"(its first {len(beginning)} characters are {count} tokens already)")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
