"""Greedy decode steps from a fixed prompt, the loop that the decode tests and kernel checks share:
the prompt through the engine's prompt path into a fresh KV cache, then one step per token
through a decoder the caller makes (its graphs, paths and clock as the test wants) or, without
one, the engine's own decode step. Not collected by pytest (no test_ prefix)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.runtime.decoder import Decoder
from coordinator.runtime.engine import Engine
from coordinator.runtime.model import KVCache

PROMPT = "The quick brown fox"


@dataclass
class GreedyRun:
    tokens: list[int]  # the tokens fed, one per step
    logits: torch.Tensor  # [steps, V], in the model's device and dtype
    decoder: Decoder | None  # the one the caller's factory made
    kv: KVCache


def greedy_steps(engine: Engine, steps: int, *, capacity: int = 64,
                 decoder: Callable[[KVCache], Decoder] | None = None, forced: list[int] | None = None) -> GreedyRun:
    """`steps` decode steps after PROMPT: each feeds the argmax of the logits before it, or
    forced[step] (teacher forcing: two runs then see the same inputs)."""
    prompt = engine.encode(PROMPT)
    kv = KVCache(engine.config, capacity, engine.device, engine.dtype)
    logits = engine._prefill(prompt, kv)
    made = decoder(kv) if decoder is not None else None
    tokens, rows = [], []
    for step in range(steps):
        tokens.append(int(logits[-1].argmax()) if forced is None else forced[step])
        position = len(prompt) + step
        logits = (made.step(tokens[-1], position) if made is not None
                  else engine._decode_step(tokens[-1], position, kv)).clone()
        rows.append(logits[0])
    return GreedyRun(tokens, torch.stack(rows), made, kv)
