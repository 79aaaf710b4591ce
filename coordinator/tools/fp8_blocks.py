"""FP8 block-quantized checkpoints (DeepSeek-V3 / R1 as published), read as they come: each
block-scaled weight is dequantized when it is read, and pack then stores it as its options ask
(HQQ codes, or unquantized in the checkpoint's dtype), exactly as it would the dequantized
checkpoint.

The format (config.json's `quantization_config: {quant_method: fp8, fmt: e4m3, weight_block_size:
[BR, BC], activation_scheme: dynamic}`, transformers' FineGrainedFP8Config): a weight `X.weight`
is float8_e4m3fn [O, I] beside `X.weight_scale_inv` float32 [ceil(O/BR), ceil(I/BC)], and
W[o, i] = fp8[o, i] * scale_inv[o // BR, i // BC]: one scale per BR x BC block, the blocks at the
right and bottom edges cut short (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows: 4.5 blocks).
The multiply is done in float32, then cast, as DeepSeek's weight_dequant and transformers do.
"dynamic" activation scaling concerns only FP8 matmuls, which are not run here.

Knows nothing of tensor names beyond the `_scale_inv` suffix (the checkpoint reader pairs them,
coordinator/tools/checkpoint.py) nor of families (deepseek_v3.py refuses other methods by name)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import ConfigError

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # e5m2 is recognised only to be refused by name


@dataclass(frozen=True)
class Fp8Blocks:
    rows: int  # BR: weight rows per scale
    columns: int  # BC: weight columns per scale

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, int]:
        out_features, in_features = weight_shape
        return (math.ceil(out_features / self.rows), math.ceil(in_features / self.columns))


def block_format(hf: dict[str, Any], *, source: str) -> Fp8Blocks | None:
    """The block size of an FP8 block checkpoint's config.json, None when its quantization_config
    names no `fp8` method (a family reads or refuses the other methods); any setting of an fp8
    config other than e4m3 weights in 2-D blocks with dynamic activations is refused by name."""
    quant = hf.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: quantization_config.fmt {fmt!r} is not supported (moe-edge reads fp8 'e4m3')")
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"{source}: quantization_config.activation_scheme {scheme!r} is not supported "
                          "(moe-edge reads 'dynamic' fp8 checkpoints)")
    size = quant.get("weight_block_size", [128, 128])  # transformers' FineGrainedFP8Config default
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)):
        raise ConfigError(f"{source}: quantization_config.weight_block_size {size!r} is not supported "
                          "(moe-edge reads block-scaled fp8: two positive block sizes, e.g. [128, 128])")
    return Fp8Blocks(size[0], size[1])


def check_pair(weight_dtype: torch.dtype, weight_shape: tuple[int, ...], scale_dtype: torch.dtype,
               scale_shape: tuple[int, ...], blocks: Fp8Blocks, *, where: str, name: str) -> None:
    """Refuse, naming the tensor, an FP8 weight that is not e4m3 [O, I] or whose scales are not
    float32 [ceil(O/BR), ceil(I/BC)]; from dtypes and shapes alone, so before anything is read."""
    if weight_dtype != torch.float8_e4m3fn:
        raise ConfigError(f"{where}: tensor {name} is {weight_dtype}; moe-edge reads fp8 blocks of torch.float8_e4m3fn")
    if len(weight_shape) != 2:
        raise ConfigError(f"{where}: tensor {name} is fp8 of shape {list(weight_shape)}; block scaling is for matrices")
    wanted = blocks.scale_shape(tuple(weight_shape))
    if scale_dtype != torch.float32 or tuple(scale_shape) != wanted:
        raise ConfigError(f"{where}: tensor {name}{SCALE_SUFFIX} is {scale_dtype} {list(scale_shape)}; for a "
                          f"{list(weight_shape)} weight in {blocks.rows}x{blocks.columns} blocks it must be "
                          f"torch.float32 {list(wanted)}")


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, blocks: Fp8Blocks, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [O, I] and scale_inv [ceil(O/BR), ceil(I/BC)] -> the [O, I] weight in `dtype`."""
    out_features, in_features = weight.shape
    scale = scale_inv.repeat_interleave(blocks.rows, dim=0)[:out_features]  # [O, ceil(I/BC)]
    scale = scale.repeat_interleave(blocks.columns, dim=1)[:, :in_features]  # [O, I]
    return (weight.to(torch.float32) * scale).to(dtype)
