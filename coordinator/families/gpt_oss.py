"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): attention with a learned sink logit per head, q/k/v and
o biases, a sliding window on the layers `layer_types` calls "sliding_attention", YaRN rotary;
a router with a bias whose top k logits are softmaxed among themselves; experts with biases and
a clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`).

transformers keeps a layer's experts fused, as save_pretrained writes them:
`mlp.experts.gate_up_proj` [E, H, 2F] with gate and up interleaved along the last dim (gate in
the even columns), `gate_up_proj_bias` [E, 2F] likewise, `down_proj` [E, F, H], `down_proj_bias`
[E, H]; all are applied as x @ W. Here they become the store's w13 = [gate; up] [2F, H] and
w2 [H, F] (nn.Linear's orientation), biases in the same order.

The published checkpoints store the experts in MXFP4 (config.json's quantization_config
quant_method "mxfp4"), already in nn.Linear's orientation: `gate_up_proj_blocks` uint8
[E, 2F, H/32, 16] (the 2F rows interleaved, gate in the even ones) with `gate_up_proj_scales`
[E, 2F, H/32], `down_proj_blocks` [E, H, F/32, 16] with `down_proj_scales` [E, H, F/32]; the
biases are plain. They are kept as stored (common/mxfp4.py): gate and up are told apart by
taking whole rows, so no code is re-encoded.

Refused: other quantization methods, rope types other than YaRN and the default, layer types
other than sliding and full attention. Nothing is knowingly left out."""

from __future__ import annotations

from typing import Any

import torch

from common.errors import ConfigError
from common.model_config import ModelConfig
from common.mxfp4 import BLOCK, Mxfp4Matrix
from common.store import dense_names

from . import hf_layout

MODEL_TYPE = "gpt_oss"
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # GPT-OSS's own values, for configs that do not carry them
EXPERTS = "model.layers.{layer}.mlp.experts"
LAYER_TYPES = ("sliding_attention", "full_attention")
QUANT_METHODS = ("mxfp4",)  # the only checkpoint quantization read (kept as stored); FP8 blocks are not


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import GptOssConfig

    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):  # mxfp4: the experts' tensors say so themselves (expert_matrices)
        raise ConfigError(f"{source}: quantization_config.quant_method {quant!r}: only MXFP4 experts are read; "
                          "pack a bf16 copy of the checkpoint")
    config = hf_layout.hf_config(GptOssConfig, hf, source=source)
    for index, layer_type in enumerate(config.layer_types):
        hf_layout.require(source, f"layer_types[{index}]", layer_type, LAYER_TYPES)
    sliding = tuple(i for i, t in enumerate(config.layer_types) if t == "sliding_attention")
    return ModelConfig(
        **hf_layout.shared_fields(config, source, ("yarn", "default"), intermediate_size=config.intermediate_size,
                                  num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                                  sliding_window=config.sliding_window if sliding else None),
        family=MODEL_TYPE,
        attention_bias=bool(config.attention_bias),
        output_bias=bool(config.attention_bias),  # one setting for all four projections
        attention_sinks=True,
        sliding_layers=sliding if sliding and config.sliding_window else None,
        router="topk_softmax",
        expert_bias=True,
        expert_activation="clamped_swiglu",
        # transformers before 5.2x fixed alpha at 1.702 in the model code and kept only the limit in the config
        swiglu_alpha=float(getattr(config, "swiglu_alpha", None) or hf.get("swiglu_alpha", SWIGLU_ALPHA)),
        swiglu_limit=float(getattr(config, "swiglu_limit", None) or hf.get("swiglu_limit", SWIGLU_LIMIT)),
        **hf_layout.yarn_fields(config, source, MODEL_TYPE),
    )


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    config = checkpoint.config
    tensors = hf_layout.embeddings_and_head(checkpoint)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        tensors.update(hf_layout.attention(checkpoint, layer))
        if config.output_bias:
            tensors[dense_names.attention_bias(layer, "o_proj")] = checkpoint.tensor(f"{prefix}.self_attn.o_proj.bias")
        tensors[dense_names.attention_sinks(layer)] = checkpoint.tensor(f"{prefix}.self_attn.sinks")
        tensors[dense_names.router(layer)] = checkpoint.tensor(f"{prefix}.mlp.router.weight")
        tensors[dense_names.router_logit_bias(layer)] = checkpoint.tensor(f"{prefix}.mlp.router.bias")
    return tensors


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor | Mxfp4Matrix, ...]:
    """(w1 gate [F, H], w3 up [F, H], w2 down [H, F]) of one expert, from the fused tensors:
    plain tensors, or Mxfp4Matrix where the checkpoint stores MXFP4."""
    prefix = EXPERTS.format(layer=layer)
    if checkpoint.has(f"{prefix}.gate_up_proj_blocks") or checkpoint.has(f"{prefix}.down_proj_blocks"):
        config = checkpoint.config
        hidden, ffn = config.hidden_size, config.intermediate_size
        gate_up = _mxfp4(checkpoint, f"{prefix}.gate_up_proj", 2 * ffn, hidden)[expert]  # [2F, H], interleaved
        down = _mxfp4(checkpoint, f"{prefix}.down_proj", hidden, ffn)[expert]  # [H, F]
        return gate_up.rows(slice(0, None, 2)), gate_up.rows(slice(1, None, 2)), down
    gate_up = checkpoint.tensor(f"{prefix}.gate_up_proj")[expert]  # [H, 2F], gate and up interleaved
    down = checkpoint.tensor(f"{prefix}.down_proj")[expert]  # [F, H]
    return gate_up[:, 0::2].t().contiguous(), gate_up[:, 1::2].t().contiguous(), down.t().contiguous()


def expert_biases(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b13 = [gate; up] [2F], b2 [H]) of one expert, in the order of expert_matrices' w13."""
    prefix = EXPERTS.format(layer=layer)
    gate_up = checkpoint.tensor(f"{prefix}.gate_up_proj_bias")[expert]  # [2F], interleaved
    return torch.cat([gate_up[0::2], gate_up[1::2]]), checkpoint.tensor(f"{prefix}.down_proj_bias")[expert]


class _Mxfp4Experts:
    """A layer's fused MXFP4 experts, checked once; `[expert]` gives one expert's matrix."""

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        self.blocks, self.scales = blocks, scales

    def __getitem__(self, expert: int) -> Mxfp4Matrix:
        blocks = self.blocks[expert]  # [O, B, 16]: 16 bytes hold a block's 32 codes
        return Mxfp4Matrix(blocks.reshape(blocks.shape[0], -1), self.scales[expert])


def _mxfp4(checkpoint, name: str, out_features: int, in_features: int) -> _Mxfp4Experts:
    """`name`_blocks and `name`_scales, refused by name unless they are [E, O, I/32, 16] and
    [E, O, I/32] uint8 for this config."""
    experts = checkpoint.config.num_experts
    wanted = {f"{name}_blocks": (experts, out_features, in_features // BLOCK, BLOCK // 2),
              f"{name}_scales": (experts, out_features, in_features // BLOCK)}
    if in_features % BLOCK:
        raise ConfigError(f"{checkpoint.folder}: tensor {name}_blocks: MXFP4 needs an input width that is a "
                          f"multiple of {BLOCK}, the config has {in_features}")
    tensors = []
    for tensor_name, shape in wanted.items():
        if not checkpoint.has(tensor_name):
            raise ConfigError(f"{checkpoint.folder}: tensor {tensor_name} is missing: an MXFP4 matrix needs its "
                              f"blocks and its scales")
        tensor = checkpoint.tensor(tensor_name)
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != shape:
            raise ConfigError(f"{checkpoint.folder}: tensor {tensor_name} is {tensor.dtype} {list(tensor.shape)}; "
                              f"MXFP4 for this config is torch.uint8 {list(shape)}")
        tensors.append(tensor)
    return _Mxfp4Experts(*tensors)


def left_out(name: str, config: ModelConfig) -> bool:
    return False
