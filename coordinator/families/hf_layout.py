"""What the Llama-descended MoE checkpoints share: their tensor names and the config settings
every family reads the same way. A family module (mixtral.py, qwen3_moe.py, ...) picks from
these; the store's names are common/store/dense_names.py.

`checkpoint` is anything with `config`, `folder`, `has(name)` and `tensor(name)`: the real
checkpoint when packing, or its shape view when pack sizes the store and lists the tensors a
family reads (every other tensor is refused by name, tools/pack.py)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from common.errors import ConfigError, StoreError
from common.store import dense_names


def hf_config(config_class, hf: dict[str, Any], *, source: str):
    """transformers' own config class over config.json, so defaults and legacy keys mean what
    they mean to transformers."""
    try:
        return config_class(**{k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: not a valid {config_class.__name__}: {err}") from None


def require(source: str, setting: str, value: Any, allowed: tuple, why: str = "") -> None:
    """Refuse a config setting moe-edge does not implement, naming it."""
    if value not in allowed:
        choices = " or ".join(repr(a) for a in allowed)
        raise ConfigError(f"{source}: {setting} {value!r} is not supported (moe-edge runs {choices}{why})")


def rope_theta(config, source: str, types: tuple[str, ...] = ("default",)) -> float:
    """The rotary embedding's base; a rope type not in `types` (by default every one but the
    default: YaRN, linear, dynamic) is refused."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    require(source, "rope_type", _rope_type(rope), types)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConfigError(f"{source}: no rope_theta")
    return float(theta)


def _rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def yarn_fields(config, source: str, family: str, *, softmax_mscale: bool = False) -> dict[str, Any]:
    """The ModelConfig rope fields of a config whose rope is YaRN or the default, resolved as
    transformers' _compute_yarn_parameters does ({} for the default). `softmax_mscale`:
    the family also multiplies its softmax scale by mscale(factor, mscale_all_dim)^2 (DeepSeek's
    yarn_apply_mscale), recorded as softmax_scale_factor."""
    rope = dict(config.rope_parameters or {})
    rope_type = _rope_type(rope)
    require(source, "rope_parameters.rope_type", rope_type, ("yarn", "default"))
    if partial_rotary_factor(config) != 1.0:
        raise ConfigError(f"{source}: rope_parameters.partial_rotary_factor is not supported for {family}")
    if rope_type == "default":
        return {}
    original = rope.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"{source}: rope_parameters.original_max_position_embeddings is needed for rope_type 'yarn'")
    factor = rope.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    fields = dict(
        rope_type="yarn",
        rope_factor=float(factor),
        rope_original_max_position_embeddings=int(original),
        rope_beta_fast=float(rope.get("beta_fast") or 32),  # `or`: a 0 means the default, as in transformers
        rope_beta_slow=float(rope.get("beta_slow") or 1),
        rope_truncate=bool(rope.get("truncate", True)),
        rope_attention_factor=float(attention_factor),
    )
    if softmax_mscale and mscale_all_dim:
        fields["softmax_scale_factor"] = yarn_mscale(factor, mscale_all_dim) ** 2
    return fields


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scaling for a context extended `scale` times (transformers' get_mscale
    and DeepSeek's yarn_get_mscale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def partial_rotary_factor(config) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def first_eos(config) -> int | None:
    eos = config.eos_token_id
    if isinstance(eos, (list, tuple)):
        return eos[0] if eos else None
    return eos


def embeddings_and_head(checkpoint) -> dict[str, torch.Tensor]:
    tensors = {
        dense_names.EMBED: checkpoint.tensor("model.embed_tokens.weight"),
        dense_names.FINAL_NORM: checkpoint.tensor("model.norm.weight"),
    }
    if not checkpoint.config.tie_word_embeddings:
        tensors[dense_names.LM_HEAD] = checkpoint.tensor("lm_head.weight")
    return tensors


def attention(checkpoint, layer: int) -> dict[str, torch.Tensor]:
    """The layer's norms and attention: q/k/v/o weights, q/k/v biases and q/k norms where the
    config says the model has them."""
    config, prefix = checkpoint.config, f"model.layers.{layer}"
    tensors = {
        dense_names.input_norm(layer): checkpoint.tensor(f"{prefix}.input_layernorm.weight"),
        dense_names.post_attention_norm(layer): checkpoint.tensor(f"{prefix}.post_attention_layernorm.weight"),
    }
    for projection in dense_names.ATTENTION_PROJECTIONS:
        tensors[dense_names.attention(layer, projection)] = checkpoint.tensor(f"{prefix}.self_attn.{projection}.weight")
    if config.attention_bias:
        for projection in ("q_proj", "k_proj", "v_proj"):
            tensors[dense_names.attention_bias(layer, projection)] = checkpoint.tensor(f"{prefix}.self_attn.{projection}.bias")
    if config.qk_norm != "none":
        tensors[dense_names.q_norm(layer)] = checkpoint.tensor(f"{prefix}.self_attn.q_norm.weight")
        tensors[dense_names.k_norm(layer)] = checkpoint.tensor(f"{prefix}.self_attn.k_norm.weight")
    return tensors


def gated_mlp(checkpoint, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 = [gate; up] [2F, H], w2 = down [H, F]) of the SiLU-gated MLP at `prefix`."""
    gate, up = checkpoint.tensor(f"{prefix}.gate_proj.weight"), checkpoint.tensor(f"{prefix}.up_proj.weight")
    return torch.cat([gate, up], dim=0), checkpoint.tensor(f"{prefix}.down_proj.weight")


def routed_expert(checkpoint, layer: int, expert: int, experts_prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1 gate [F, H], w3 up [F, H], w2 down [H, F]) of one routed expert, from per-expert
    names (how checkpoints are published) or transformers 5's fused in-memory names."""
    prefix = experts_prefix.format(layer=layer)
    if checkpoint.has(f"{prefix}.{expert}.gate_proj.weight"):
        return tuple(checkpoint.tensor(f"{prefix}.{expert}.{w}.weight") for w in ("gate_proj", "up_proj", "down_proj"))
    if checkpoint.has(f"{prefix}.gate_up_proj"):
        w1, w3 = checkpoint.tensor(f"{prefix}.gate_up_proj")[expert].chunk(2, dim=0)
        return w1, w3, checkpoint.tensor(f"{prefix}.down_proj")[expert]
    raise StoreError(f"{checkpoint.folder}: no weights for layer {layer} expert {expert} ({prefix}.{expert}.gate_proj.weight)")


def shared_fields(config, source: str, rope_types: tuple[str, ...] = ("default",), **overrides: Any) -> dict[str, Any]:
    """The ModelConfig fields every family here reads the same way from its transformers config,
    with a family's `overrides` (its experts' sizes, a head size of its own) over them; a rope
    type not in `rope_types` is refused."""
    return {**dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim(config),
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=rope_theta(config, source, rope_types),
        max_position_embeddings=config.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        bos_token_id=config.bos_token_id,
        eos_token_id=first_eos(config),
    ), **overrides}


def grouped_sigmoid_fields(config) -> dict[str, Any]:
    """The ModelConfig fields of DeepSeek-V3's MoE layout, which GLM-4.5 shares: sigmoid routing
    with a correction bias, group-limited top-k, routed scaling, dense first layers, shared experts."""
    dense = tuple(range(min(config.first_k_dense_replace, config.num_hidden_layers)))
    return dict(
        router="sigmoid_grouped",
        norm_topk_prob=bool(config.norm_topk_prob),
        router_bias=True,
        n_group=config.n_group,
        topk_group=config.topk_group,
        routed_scaling_factor=float(config.routed_scaling_factor),
        dense_layers=dense,
        dense_intermediate_size=config.intermediate_size if dense else None,
        shared_expert_intermediate_size=config.moe_intermediate_size * config.n_shared_experts,
    )


def ffn_tensors(checkpoint, layer: int, *, router_bias: bool = False, shared_prefix: str | None = None,
                shared_gate: bool = False) -> dict[str, torch.Tensor]:
    """A layer's FFN part of the dense tensors: a dense layer's MLP; or a MoE layer's router (with
    its choice bias), and its shared expert at `mlp.<shared_prefix>` (with its gate)."""
    config, mlp = checkpoint.config, f"model.layers.{layer}.mlp"
    tensors: dict[str, torch.Tensor] = {}
    if layer in config.dense_layers:
        tensors[dense_names.dense_ffn(layer, "w13")], tensors[dense_names.dense_ffn(layer, "w2")] = gated_mlp(checkpoint, mlp)
        return tensors
    tensors[dense_names.router(layer)] = checkpoint.tensor(f"{mlp}.gate.weight")
    if router_bias:
        tensors[dense_names.router_bias(layer)] = checkpoint.tensor(f"{mlp}.gate.e_score_correction_bias")
    if shared_prefix is not None and config.shared_expert_intermediate_size:
        tensors[dense_names.shared_expert(layer, "w13")], tensors[dense_names.shared_expert(layer, "w2")] = \
            gated_mlp(checkpoint, f"{mlp}.{shared_prefix}")
        if shared_gate:
            tensors[dense_names.shared_expert_gate(layer)] = checkpoint.tensor(f"{mlp}.{shared_prefix}_gate.weight")
    return tensors


def layered_dense_tensors(checkpoint, *, attention_of=None, **ffn_options: Any) -> dict[str, torch.Tensor]:
    """The store's dense tensors of a family in transformers' layout: embeddings and head, then
    per layer its attention (`attention_of`, default `attention`) and its FFN part (ffn_tensors
    with `ffn_options`)."""
    attention_of = attention_of or attention
    tensors = embeddings_and_head(checkpoint)
    for layer in range(checkpoint.config.num_layers):
        tensors.update(attention_of(checkpoint, layer))
        tensors.update(ffn_tensors(checkpoint, layer, **ffn_options))
    return tensors


def past_the_layers(name: str, config) -> bool:
    """A tensor of a layer numbered from num_hidden_layers on: GLM's and DeepSeek's
    multi-token-prediction layers, which plain decoding does not use."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return match is not None and int(match.group(1)) >= config.num_layers
