"""HQQ weight quantization and the packed-code format the rest of the project reads.

hqq finds the codes, scales and zero points (its half-quadratic optimizer); we store them in a
layout of our own that a GPU kernel can read in one pass:

- groups of `group_size` consecutive weights along the input dimension (HQQ axis=1), each with
  an fp16 scale and zero: W[o, i] = (code[o, i] - zero[o, g]) * scale[o, g], g = i // group_size;
- codes are split into bit planes of width 4, 2 or 1 (4 bits: [4]; 3 bits: [2, 1]; 2 bits: [2]);
- a plane of width w packs p = 8 // w codes per byte, "planar" within a row: byte j of row o holds
  the codes of columns j, j + P, j + 2P, ... (P = in_features // p), the first in the high bits.

A QuantSpec also names the stored format: "hqq" (the above) or "mxfp4", a checkpoint's own
MXFP4 kept as it is read (common/mxfp4.py: 4 bits, a power-of-two scale per 32 weights).

Shapes: O = out_features, I = in_features, G = I // group_size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

SUPPORTED_BITS = (16, 4, 3, 2)  # 16: no quantization, the checkpoint's dtype is kept
FORMATS = ("hqq", "mxfp4")
MXFP4_BITS, MXFP4_GROUP = 4, 32  # what the OCP microscaling format fixes


def bit_planes(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes that store `bits`-bit codes, most significant first."""
    planes = {4: (4,), 3: (2, 1), 2: (2,)}
    if bits not in planes:
        raise ConfigError(f"bits={bits}: quantized codes must be 4, 3 or 2 bits")
    return planes[bits]


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = 64
    format: str = "hqq"  # "mxfp4": a checkpoint's MXFP4 kept as stored, never made by quantizing here

    @classmethod
    def mxfp4(cls) -> "QuantSpec":
        return cls(MXFP4_BITS, MXFP4_GROUP, "mxfp4")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.format == "mxfp4" and (self.bits, self.group_size) != (MXFP4_BITS, MXFP4_GROUP):
            raise ConfigError(f"format 'mxfp4' is {MXFP4_BITS} bits in groups of {MXFP4_GROUP}, "
                              f"not {self.bits} bits in groups of {self.group_size}")
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.quantized and (self.group_size < 8 or self.group_size % 8):
            raise ConfigError(f"--group-size {self.group_size}: must be a multiple of 8")

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    def check_fits(self, in_features: int, *, what: str) -> None:
        if self.quantized and in_features % self.group_size:
            raise ConfigError(
                f"--group-size {self.group_size} does not divide the input width {in_features} of {what}"
            )

    @property
    def is_mxfp4(self) -> bool:
        return self.format == "mxfp4"

    def to_dict(self) -> dict:
        data = {"bits": self.bits, "group_size": self.group_size}
        if self.format != "hqq":  # left out at the default, so older stores keep their model_id
            data["format"] = self.format
        return data


def pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """[O, I] codes < 2**width -> [O, I * width // 8] uint8, planar within each row."""
    per_byte = 8 // width
    out_features, in_features = codes.shape
    stride = in_features // per_byte
    codes = codes.to(torch.uint8)
    packed = torch.zeros(out_features, stride, dtype=torch.uint8)
    for k in range(per_byte):
        shift = 8 - width * (k + 1)
        packed |= codes[:, k * stride : (k + 1) * stride] << shift
    return packed


def unpack_plane(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of pack_plane: [O, I * width // 8] uint8 -> [O, I] uint8 codes."""
    per_byte = 8 // width
    mask = (1 << width) - 1
    parts = [(packed >> (8 - width * (k + 1))) & mask for k in range(per_byte)]
    return torch.cat(parts, dim=1)


@dataclass
class QuantizedMatrix:
    """A quantized [O, I] weight as views (into a blob, or standalone tensors)."""

    planes: tuple[torch.Tensor, ...]  # each [O, I * width // 8] uint8
    scale: torch.Tensor  # [O, G] fp16
    zero: torch.Tensor  # [O, G] fp16
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scale.shape[0], self.scale.shape[1] * self.group_size)

    def codes(self) -> torch.Tensor:
        """[O, I] integer codes as uint8."""
        widths = bit_planes(self.bits)
        codes = unpack_plane(self.planes[0], widths[0])
        for plane, width in zip(self.planes[1:], widths[1:]):
            codes = (codes << width) | unpack_plane(plane, width)
        return codes

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[O, I] weight in `dtype` (arithmetic in float32, as HQQ's reference does in fp32)."""
        out_features, in_features = self.shape
        codes = self.codes().to(torch.float32).view(out_features, -1, self.group_size)  # [O, G, group]
        weight = (codes - self.zero.float()[..., None]) * self.scale.float()[..., None]
        return weight.view(out_features, in_features).to(dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        named = {f"{prefix}.codes.p{n}": plane for n, plane in enumerate(self.planes)}
        named[f"{prefix}.scale"] = self.scale
        named[f"{prefix}.zero"] = self.zero
        return named

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], prefix: str, spec: QuantSpec) -> "QuantizedMatrix":
        planes = tuple(named[f"{prefix}.codes.p{n}"] for n in range(len(bit_planes(spec.bits))))
        return cls(planes, named[f"{prefix}.scale"], named[f"{prefix}.zero"], spec.bits, spec.group_size)


def quantized_shapes(out_features: int, in_features: int, spec: QuantSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name suffix -> (dtype, shape) of the tensors that store one quantized [O, I] matrix."""
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for n, width in enumerate(bit_planes(spec.bits)):
        shapes[f"codes.p{n}"] = (torch.uint8, (out_features, in_features * width // 8))
    groups = in_features // spec.group_size
    shapes["scale"] = (torch.float16, (out_features, groups))
    shapes["zero"] = (torch.float16, (out_features, groups))
    return shapes


def quantize_matrix(weight: torch.Tensor, spec: QuantSpec) -> QuantizedMatrix:
    """HQQ-quantize an [O, I] weight (on the CPU, float32 arithmetic)."""
    from hqq.core.quantize import Quantizer

    out_features, in_features = weight.shape
    codes, meta = Quantizer.quantize(
        weight.float(),
        nbits=spec.bits,
        group_size=spec.group_size,
        axis=1,
        bitpack=False,
        optimize=True,
        compute_dtype=torch.float32,
        device="cpu",
    )
    codes = codes.round().clamp(0, 2**spec.bits - 1).to(torch.uint8).view(out_features, in_features)
    widths = bit_planes(spec.bits)
    planes = []
    remaining_bits = spec.bits
    for width in widths:
        remaining_bits -= width
        planes.append(pack_plane((codes >> remaining_bits) & ((1 << width) - 1), width))
    scale = meta["scale"].view(out_features, -1).to(torch.float16)
    zero = meta["zero"].view(out_features, -1).to(torch.float16)
    return QuantizedMatrix(tuple(planes), scale, zero, spec.bits, spec.group_size)
