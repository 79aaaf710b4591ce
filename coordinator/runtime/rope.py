"""The rotary embedding's frequencies per rope type, as transformers computes them
(modeling_rope_utils: the default, and `_compute_yarn_parameters`), in float32.

    default  inv_freq = 1 / theta^(2i/R)
    yarn     YaRN (Peng et al. 2023): dimensions that turn fast within the original context keep
             their frequency, slow ones are divided by `factor`, with a linear ramp between
             (bounds from beta_fast and beta_slow rotations); cos and sin are multiplied by the
             attention factor (0.1 ln(factor) + 1 unless the config gives one).

Knows nothing of positions or tensors on the device: model.RotaryEmbedding builds the tables.
R = the rotary width (ModelConfig.rotary_width)."""

from __future__ import annotations

import math

import torch

from common.model_config import ModelConfig


def inverse_frequencies(config: ModelConfig, dim: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [R/2] float32, the factor cos and sin are multiplied by); R is `dim` where given
    (latent attention's qk_rope_head_dim), else the config's rotary width."""
    dim, base = dim or config.rotary_width, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [R/2]
    if config.rope_type == "default":
        return 1.0 / (base**exponents), config.rope_attention_factor
    pos_freqs = base**exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (config.rope_factor * pos_freqs)
    low, high = _correction_range(config, dim)
    # 1 where a dimension keeps its trained frequency, 0 where it is interpolated
    keep = 1 - _linear_ramp(low, high, dim // 2)
    return interpolation * (1 - keep) + extrapolation * keep, config.rope_attention_factor


def _correction_range(config: ModelConfig, dim: int) -> tuple[float, float]:
    """The dimensions (as fractional indices of the R/2 frequencies) between which the ramp runs."""
    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times in the original context
        context = config.rope_original_max_position_embeddings
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(config.rope_theta))

    low, high = dimension_of(config.rope_beta_fast), dimension_of(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _linear_ramp(low: float, high: float, size: int) -> torch.Tensor:
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    return torch.clamp((torch.arange(size, dtype=torch.float32) - low) / (high - low), 0, 1)

