"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases, softmax routing, and beside the
routed experts a shared expert on the device whose output is scaled by sigmoid(x . gate); dense
layers where `mlp_only_layers` or `decoder_sparse_step` say so.

Left out, refused when set: sliding-window attention (`use_sliding_window`), rope types other
than the default, activations other than SiLU."""

from __future__ import annotations

from typing import Any

import torch

from common.model_config import ModelConfig

from . import hf_layout
from .qwen3_moe import dense_layers_of

MODEL_TYPE = "qwen2_moe"
EXPERTS = "model.layers.{layer}.mlp.experts"


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import Qwen2MoeConfig

    config = hf_layout.hf_config(Qwen2MoeConfig, hf, source=source)
    hf_layout.require(source, "hidden_act", config.hidden_act, ("silu",))
    hf_layout.require(source, "use_sliding_window", bool(config.use_sliding_window), (False,))
    dense = dense_layers_of(config)
    return ModelConfig(
        **hf_layout.shared_fields(config, source, intermediate_size=config.moe_intermediate_size, num_experts=config.num_experts,
                                  top_k=config.num_experts_per_tok),
        family=MODEL_TYPE,
        attention_bias=bool(getattr(config, "qkv_bias", True)),
        norm_topk_prob=bool(config.norm_topk_prob),
        dense_layers=dense,
        dense_intermediate_size=config.intermediate_size if dense else None,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        shared_expert_gate=True,
    )


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return hf_layout.layered_dense_tensors(checkpoint, shared_prefix="shared_expert", shared_gate=True)


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hf_layout.routed_expert(checkpoint, layer, expert, EXPERTS)


def left_out(name: str, config: ModelConfig) -> bool:
    return False
