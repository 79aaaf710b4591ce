"""OLMoE (allenai/OLMoE-1B-7B): like Qwen3-MoE but its q and k norms are one RMSNorm over the
whole projection (all heads together), every layer has experts, and the top-k is renormalised
only when `norm_topk_prob`.

Left out, refused when set: `clip_qkv`, rope types other than the default, activations other
than SiLU."""

from __future__ import annotations

from typing import Any

import torch

from common.model_config import ModelConfig

from . import hf_layout

MODEL_TYPE = "olmoe"
EXPERTS = "model.layers.{layer}.mlp.experts"


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import OlmoeConfig

    config = hf_layout.hf_config(OlmoeConfig, hf, source=source)
    hf_layout.require(source, "hidden_act", config.hidden_act, ("silu",))
    hf_layout.require(source, "clip_qkv", config.clip_qkv, (None,))
    return ModelConfig(
        **hf_layout.shared_fields(config, source, intermediate_size=config.intermediate_size, num_experts=config.num_experts,
                                  top_k=config.num_experts_per_tok),
        family=MODEL_TYPE,
        attention_bias=bool(config.attention_bias),
        qk_norm="projection",
        norm_topk_prob=bool(config.norm_topk_prob),
    )


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return hf_layout.layered_dense_tensors(checkpoint)


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hf_layout.routed_expert(checkpoint, layer, expert, EXPERTS)


def left_out(name: str, config: ModelConfig) -> bool:
    return False
