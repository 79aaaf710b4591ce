"""DeepSeek-V3 / DeepSeek-R1 / Kimi-K2 (transformers' DeepseekV3Config): multi-head latent
attention (q through the q_lora_rank bottleneck, k and v through the kv_lora_rank latent, rotary
on a qk_rope_head_dim part, interleaved when `rope_interleave`; coordinator/runtime/
latent_attention.py); the routing is GLM-4.5's: sigmoid scores with a correction bias for the
choice only, group-limited top-k (`n_group`, `topk_group`), renormalised when `norm_topk_prob`,
scaled by `routed_scaling_factor`; `n_shared_experts` shared experts on the device; the first
`first_k_dense_replace` layers dense.

Rotary: the default or YaRN (DeepSeek-V3's and R1's published configs: factor 40 over 4096
positions), on the qk_rope_head_dim part, resolved as transformers does; with YaRN the softmax
scale is also multiplied by mscale(factor, mscale_all_dim)^2 (transformers' yarn_apply_mscale),
ModelConfig.softmax_scale_factor.

Knowingly left out: the multi-token-prediction layers (`num_nextn_predict_layers`, stored as
layers past `num_hidden_layers`), which plain decoding does not use. The published FP8 block
checkpoints are read as they come (quantization_config quant_method "fp8", a `weight_scale_inv`
beside each block-scaled weight): the checkpoint reader dequantizes each weight as it is read
(coordinator/tools/fp8_blocks.py), so nothing here sees FP8; it refuses other quantization
methods by name. Refused here by name: rope types other than the default and YaRN, attention
biases, activations other than SiLU."""

from __future__ import annotations

from typing import Any

import torch

from common.model_config import ModelConfig
from common.store import dense_names

from . import hf_layout

MODEL_TYPE = "deepseek_v3"
EXPERTS = "model.layers.{layer}.mlp.experts"


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import DeepseekV3Config

    config = hf_layout.hf_config(DeepseekV3Config, hf, source=source)
    hf_layout.require(source, "hidden_act", config.hidden_act, ("silu",))
    hf_layout.require(source, "attention_bias", bool(config.attention_bias), (False,))
    return ModelConfig(
        **hf_layout.shared_fields(
            config, source, rope_types=("default", "yarn"), intermediate_size=config.moe_intermediate_size,
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok, head_dim=config.qk_nope_head_dim + config.qk_rope_head_dim,
            num_kv_heads=config.num_attention_heads),  # latent attention: every query head has its own k and v
        family=MODEL_TYPE,
        **hf_layout.grouped_sigmoid_fields(config),
        attention="latent",
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        rope_interleave=bool(config.rope_interleave),
        # YaRN on the qk_rope_head_dim part (transformers' config sets head_dim to it for this)
        **hf_layout.yarn_fields(config, source, MODEL_TYPE, softmax_mscale=True),
    )


def latent_attention(checkpoint, layer: int) -> dict[str, torch.Tensor]:
    """The layer's norms and its latent attention's tensors, under the store's names."""
    config, prefix = checkpoint.config, f"model.layers.{layer}"
    attn = f"{prefix}.self_attn"
    parts = {"kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "kv_b_proj": "kv_b_proj"}
    if config.q_lora_rank is not None:
        parts.update(q_a_proj="q_a_proj", q_a_norm="q_a_layernorm", q_b_proj="q_b_proj")
    else:
        parts["q_proj"] = "q_proj"
    tensors = {dense_names.latent_attention(layer, part): checkpoint.tensor(f"{attn}.{name}.weight")
               for part, name in parts.items()}
    tensors[dense_names.attention(layer, "o_proj")] = checkpoint.tensor(f"{attn}.o_proj.weight")
    tensors[dense_names.input_norm(layer)] = checkpoint.tensor(f"{prefix}.input_layernorm.weight")
    tensors[dense_names.post_attention_norm(layer)] = checkpoint.tensor(f"{prefix}.post_attention_layernorm.weight")
    return tensors


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return hf_layout.layered_dense_tensors(checkpoint, attention_of=latent_attention, router_bias=True, shared_prefix="shared_experts")


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hf_layout.routed_expert(checkpoint, layer, expert, EXPERTS)


def left_out(name: str, config: ModelConfig) -> bool:
    """The multi-token-prediction layers: numbered from num_hidden_layers on."""
    return hf_layout.past_the_layers(name, config)
