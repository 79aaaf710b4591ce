"""How a layer's router turns logits into experts and weights, for each router the families use.

    softmax          Mixtral, Qwen2/3-MoE, OLMoE: softmax over all experts in float32, the top k,
                     renormalised to sum to 1 when norm_topk_prob (Mixtral always).
    sigmoid_grouped  GLM-4.5, DeepSeek-V3: a sigmoid score per expert; the choice adds a
                     per-expert correction bias and keeps only the best topk_group of n_group
                     groups (a group's worth is its two best scores); the weights are the chosen
                     experts' scores without the bias, renormalised when norm_topk_prob, times
                     routed_scaling_factor.
    topk_softmax     GPT-OSS: the top k of the logits (the router's linear has a bias, added by the
                     caller), softmax over those k only.

`choice_scores` is what the choice ranks experts by (for topk_softmax the softmax over all
experts, which ranks them as the logits do): the router lookahead guesses later layers'
experts from it. Device work only (no host sync), so CUDA graphs can hold it.

Dimension legend: T = tokens, E = experts per layer, k = experts per token, G = groups."""

from __future__ import annotations

import torch

from common.model_config import ModelConfig


def choice_scores(logits: torch.Tensor, config: ModelConfig, bias: torch.Tensor | None) -> torch.Tensor:
    """[T, E] logits -> [T, E] float32 scores the top k is taken from (before group limits)."""
    if config.router == "sigmoid_grouped":
        scores = torch.sigmoid(logits.float())
        return scores + bias.float() if bias is not None else scores
    return torch.softmax(logits.float(), dim=-1)


def route(logits: torch.Tensor, config: ModelConfig, bias: torch.Tensor | None, *,
          out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k] float32, experts [T, k]), written into `out` where given
    (the decoder's static buffers: no copy after), else into new tensors."""
    tokens, k = logits.shape[0], config.top_k
    weights, experts = out if out is not None else (
        torch.empty(tokens, k, dtype=torch.float32, device=logits.device),
        torch.empty(tokens, k, dtype=torch.long, device=logits.device))
    if config.router == "topk_softmax":
        top_logits = torch.topk(logits.float(), k, dim=-1, out=(torch.empty_like(weights), experts)).values  # [T, k]
        torch.softmax(top_logits, dim=-1, out=weights)
        return weights, experts
    if config.router == "softmax":
        # softmax casts to float32 inside its kernel: the numbers of logits.float() first
        torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1, out=(weights, experts))
        if config.norm_topk_prob:
            weights.div_(weights.sum(dim=-1, keepdim=True))
        return weights, experts
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores + bias.float() if bias is not None else scores
    if config.n_group > 1:
        groups = config.n_group
        group_worth = choice.view(tokens, groups, -1).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        best_groups = torch.topk(group_worth, config.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_worth).scatter_(1, best_groups, 1.0)  # [T, G]
        keep = keep.unsqueeze(-1).expand(tokens, groups, choice.shape[1] // groups).reshape(tokens, -1)
        choice = choice.masked_fill(keep == 0, float("-inf"))
    torch.topk(choice, k, dim=-1, sorted=False, out=(torch.empty_like(weights), experts))
    torch.gather(scores, 1, experts, out=weights)
    if config.norm_topk_prob:
        weights.div_(weights.sum(dim=-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:  # times 1.0 changes no number
        weights.mul_(config.routed_scaling_factor)
    return weights, experts
