"""Model families: what differs between MoE architectures lives here, one module per family.

A family module says how its Hugging Face config maps onto ModelConfig (refusing, by name, the
settings moe-edge does not implement), which checkpoint tensors become the store's dense tensors
and expert matrices, and which it knowingly leaves out (`left_out`); pack refuses every other
tensor by name. The module interface: MODEL_TYPE, model_config(hf, source=), dense_tensors(
checkpoint), expert_matrices(checkpoint, layer, expert), left_out(name, config), and where the
config says the experts have biases (expert_bias), expert_biases(checkpoint, layer, expert), and
where the family reads quantized checkpoints its own way, QUANT_METHODS (GPT-OSS's "mxfp4", kept
as stored; for the others, FP8 blocks, which the checkpoint reader dequantizes: tools/fp8_blocks.py). What the
runtime does with the config's family fields is in coordinator/runtime (weights.py, model.py,
router.py). The store, the cache, the sources and the expert host know nothing of families
beyond the blob layout. Adding a family is one new module listed in FAMILIES (and its name in
common/model_config.FAMILY_NAMES); see docs/architecture.md."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from common.errors import ConfigError
from common.model_config import FAMILY_NAMES

from . import deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES: dict[str, ModuleType] = {
    family.MODEL_TYPE: family for family in (mixtral, qwen3_moe, qwen2_moe, olmoe, glm4_moe, deepseek_v3, gpt_oss)
}
assert tuple(FAMILIES) == FAMILY_NAMES, "common/model_config.FAMILY_NAMES lists the families a store may name"


def family_for(hf_config: dict[str, Any], *, source: str) -> ModuleType:
    """The family module of a checkpoint's config.json, or a one-line refusal naming it."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (moe-edge runs {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]
