"""Mixtral (Mixtral-8x7B, -8x22B and models saved in its layout): its config and its tensor names.

Config parsing goes through transformers' own `MixtralConfig`, so defaults and legacy keys (a
top-level `rope_theta`) mean exactly what they mean to transformers. Refused when set: rope types
other than the default, activations other than SiLU. On disk, experts are
`model.layers.L.block_sparse_moe.experts.E.w1/w2/w3.weight`; a checkpoint saved from
transformers 5's fused in-memory form (`mlp.experts.gate_up_proj` / `down_proj`) is read too."""

from __future__ import annotations

from typing import Any

import torch

from common.errors import StoreError
from common.model_config import ModelConfig
from common.store import dense_names

from . import hf_layout

MODEL_TYPE = "mixtral"


def model_config(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    from transformers import MixtralConfig

    config = hf_layout.hf_config(MixtralConfig, hf, source=source)
    hf_layout.require(source, "hidden_act", config.hidden_act, ("silu",))
    return ModelConfig(**hf_layout.shared_fields(
        config, source, intermediate_size=config.intermediate_size, num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok, sliding_window=config.sliding_window))


def dense_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """The store's dense tensors (dense_names) from the checkpoint, unquantized."""
    tensors = hf_layout.embeddings_and_head(checkpoint)
    for layer in range(checkpoint.config.num_layers):
        tensors.update(hf_layout.attention(checkpoint, layer))  # Mixtral's config has no biases or q/k norms
        tensors[dense_names.router(layer)] = _router(checkpoint, layer)
    return tensors


def expert_matrices(checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1 [F, H], w3 [F, H], w2 [H, F]) of one expert."""
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    if checkpoint.has(f"{prefix}.w1.weight"):
        return tuple(checkpoint.tensor(f"{prefix}.{w}.weight") for w in ("w1", "w3", "w2"))
    fused = f"model.layers.{layer}.mlp.experts"
    if checkpoint.has(f"{fused}.gate_up_proj"):
        gate_up = checkpoint.tensor(f"{fused}.gate_up_proj")[expert]
        w1, w3 = gate_up.chunk(2, dim=0)
        return w1, w3, checkpoint.tensor(f"{fused}.down_proj")[expert]
    raise StoreError(f"{checkpoint.folder}: no weights for layer {layer} expert {expert} ({prefix}.w1.weight)")


def _router(checkpoint, layer: int) -> torch.Tensor:
    for name in (f"model.layers.{layer}.block_sparse_moe.gate.weight", f"model.layers.{layer}.mlp.gate.weight"):
        if checkpoint.has(name):
            return checkpoint.tensor(name)
    return checkpoint.tensor(f"model.layers.{layer}.block_sparse_moe.gate.weight")  # raises, naming it


def left_out(name: str, config: ModelConfig) -> bool:
    """Checkpoint tensors this family knowingly does not read."""
    return False
