"""GLM-4.5 / GLM-4.5-Air / GLM-4.6: sigmoid routing with a per-expert correction bias used for
the choice only, group-limited top-k (`n_group`, `topk_group`), renormalised when
`norm_topk_prob` and scaled by `routed_scaling_factor`; shared experts on the device beside the
routed ones; the first `first_k_dense_replace` layers dense; rotary on the first
`partial_rotary_factor` of each head; q/k norms per head when `use_qk_norm`.

Knowingly left out: the multi-token-prediction layers (`num_nextn_predict_layers`, stored as
layers past `num_hidden_layers`), which plain decoding does not use. Refused when set: rope
types other than the default, activations other than SiLU."""

from __future__ import annotations

from typing import Any

import torch

from common.model_config import ModelConfig

from . import hf_layout

MODEL_TYPE = "glm4_moe"
EXPERTS = "model.layers.{layer}.mlp.experts"


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import Glm4MoeConfig

    config = hf_layout.hf_config(Glm4MoeConfig, hf, source=source)
    hf_layout.require(source, "hidden_act", config.hidden_act, ("silu",))
    head_dim = hf_layout.head_dim(config)
    rotary_dim = int(head_dim * hf_layout.partial_rotary_factor(config))
    return ModelConfig(
        **hf_layout.shared_fields(config, source, head_dim=head_dim, intermediate_size=config.moe_intermediate_size,
                                  num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok),
        family=MODEL_TYPE,
        attention_bias=bool(config.attention_bias),
        qk_norm="head" if config.use_qk_norm else "none",
        rotary_dim=rotary_dim if rotary_dim < head_dim else None,
        **hf_layout.grouped_sigmoid_fields(config),
    )


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return hf_layout.layered_dense_tensors(checkpoint, router_bias=True, shared_prefix="shared_experts")


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hf_layout.routed_expert(checkpoint, layer, expert, EXPERTS)


def left_out(name: str, config: ModelConfig) -> bool:
    """The multi-token-prediction layers: numbered from num_hidden_layers on."""
    return hf_layout.past_the_layers(name, config)
