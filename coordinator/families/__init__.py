"""Model families: what differs between MoE architectures lives here, one module per family.

A family module says how its Hugging Face config maps onto ModelConfig and which checkpoint
tensors become the store's dense tensors and expert matrices. The store, the cache, the
sources and the expert host know nothing of families beyond the blob layout. Adding a family is
one new module listed in FAMILIES (see docs/architecture.md)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from common.errors import ConfigError

from . import mixtral

FAMILIES: dict[str, ModuleType] = {mixtral.MODEL_TYPE: mixtral}


def family_for(hf_config: dict[str, Any], *, source: str) -> ModuleType:
    """The family module of a checkpoint's config.json, or a one-line refusal naming it."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (moe-edge runs {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]
