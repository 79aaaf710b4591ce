"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): grouped-query attention with an RMSNorm over each
head of q and k, softmax routing whose top-k is renormalised when `norm_topk_prob`, and dense
layers where `mlp_only_layers` or `decoder_sparse_step` say so.

Left out, refused when set: sliding-window attention (`use_sliding_window`), rope types other
than the default, activations other than SiLU."""

from __future__ import annotations

from typing import Any

import torch

from common.model_config import ModelConfig

from . import hf_layout

MODEL_TYPE = "qwen3_moe"
EXPERTS = "model.layers.{layer}.mlp.experts"


def dense_layers_of(config) -> tuple[int, ...]:
    """transformers' rule (Qwen2/Qwen3-MoE): a layer is dense when listed in mlp_only_layers or
    when (layer + 1) is not a multiple of decoder_sparse_step."""
    return tuple(layer for layer in range(config.num_hidden_layers)
                 if layer in config.mlp_only_layers or config.num_experts == 0
                 or (layer + 1) % config.decoder_sparse_step != 0)


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import Qwen3MoeConfig

    config = hf_layout.hf_config(Qwen3MoeConfig, hf, source=source)
    hf_layout.require(source, "hidden_act", config.hidden_act, ("silu",))
    hf_layout.require(source, "use_sliding_window", bool(config.use_sliding_window), (False,))
    dense = dense_layers_of(config)
    return ModelConfig(
        **hf_layout.shared_fields(config, source, intermediate_size=config.moe_intermediate_size, num_experts=config.num_experts,
                                  top_k=config.num_experts_per_tok),
        family=MODEL_TYPE,
        attention_bias=bool(config.attention_bias),
        qk_norm="head",
        norm_topk_prob=bool(config.norm_topk_prob),
        dense_layers=dense,
        dense_intermediate_size=config.intermediate_size if dense else None,
    )


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return hf_layout.layered_dense_tensors(checkpoint)


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hf_layout.routed_expert(checkpoint, layer, expert, EXPERTS)


def left_out(name: str, config: ModelConfig) -> bool:
    """Checkpoint tensors this family knowingly does not read."""
    return False
