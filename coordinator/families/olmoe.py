"""OLMoE (allenai/OLMoE-1B-7B): like Qwen3-MoE but its q and k norms are one RMSNorm over the
whole projection (all heads together), every layer has experts, and the top-k is renormalised
only when `norm_topk_prob`.

Left out, refused when set: `clip_qkv`, rope types other than the default, activations other
than SiLU."""

from __future__ import annotations

from typing import Any

import torch

from common.model_config import ModelConfig
from common.store import dense_names

from . import hf_layout

MODEL_TYPE = "olmoe"
EXPERTS = "model.layers.{layer}.mlp.experts"


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import OlmoeConfig

    config = hf_layout.hf_config(OlmoeConfig, hf, source=source)
    hf_layout.require(source, "hidden_act", config.hidden_act, ("silu",))
    hf_layout.require(source, "clip_qkv", config.clip_qkv, (None,))
    return ModelConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=hf_layout.head_dim(config),
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=hf_layout.rope_theta(config, source),
        max_position_embeddings=config.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        bos_token_id=config.bos_token_id,
        eos_token_id=hf_layout.first_eos(config),
        family=MODEL_TYPE,
        attention_bias=bool(config.attention_bias),
        qk_norm="projection",
        norm_topk_prob=bool(config.norm_topk_prob),
    )


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    config = checkpoint.config
    tensors = hf_layout.embeddings_and_head(checkpoint)
    for layer in range(config.num_layers):
        tensors.update(hf_layout.attention(checkpoint, layer))
        tensors[dense_names.router(layer)] = checkpoint.tensor(f"model.layers.{layer}.mlp.gate.weight")
    return tensors


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hf_layout.routed_expert(checkpoint, layer, expert, EXPERTS)


def left_out(name: str, config: ModelConfig) -> bool:
    return False
