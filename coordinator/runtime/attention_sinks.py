"""Attention sinks (GPT-OSS; Xiao et al. 2023's idea, learned): each query head has one more
logit, the same for every query, that joins the softmax over the keys and takes its share of the
probability, then is dropped, so a head can attend to "nothing" and its weights sum below 1.

Only the softmax; model.py's attention does the rest. Dimension legend: K = key/value heads,
G = query heads per KV head, T = queries, S = keys."""

from __future__ import annotations

import torch


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """scores [K, G, T, S] (masked), sinks [K, G] -> probabilities [K, G, T, S] in float32."""
    heads, group, length, _ = scores.shape
    sink = sinks.float().view(heads, group, 1, 1).expand(heads, group, length, 1)  # [K, G, T, 1]
    combined = torch.cat([scores.float(), sink], dim=-1)  # [K, G, T, S+1]
    combined = combined - combined.amax(dim=-1, keepdim=True)  # as transformers does (no overflow in 16 bits)
    return torch.softmax(combined, dim=-1)[..., :-1]
