"""Turning a growing list of token ids into text pieces as they come, and stop strings.

Decoding the whole list each time would be quadratic and can split a multi-byte character; we
decode a short window and emit only text that is complete (no trailing U+FFFD)."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: a few tokens of context before what is new
        self._read_offset = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add a token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end: whatever was held back waiting for a character to complete."""
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Holds back just enough text to catch a stop string that spans pieces."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Return the text safe to emit; sets `stopped` when a stop string appears."""
        if not self.stops:
            return piece
        text = self._held + piece
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = max(len(s) for s in self.stops) - 1
        # hold back only a tail that could still grow into a stop string
        tail = 0
        for size in range(min(keep, len(text)), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stops):
                tail = size
                break
        self._held = text[len(text) - tail :] if tail else ""
        return text[: len(text) - tail]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
