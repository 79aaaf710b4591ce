"""MXFP4 weights (the OCP microscaling format) as GPT-OSS's published checkpoints store them, kept
as they are read: the store holds the checkpoint's bytes, only whole rows reordered.

An [O, I] matrix is blocks of 32 consecutive weights along the input dimension; each weight is an
e2m1 4-bit float (FP4_VALUES), two to a byte, the low nibble the even column and the high nibble
the odd one; each block has one uint8 e8m0 scale: W[o, i] = FP4_VALUES[code] * 2**(scale - 127).
This is how transformers reads them (transformers/integrations/mxfp4.py,
`convert_moe_packed_tensors`), there after a transpose to its x @ W orientation; here in
nn.Linear's [out, in].

Knows nothing of checkpoints' tensor names (coordinator/families/gpt_oss.py) or of blobs
(common/store/blob_layout.py): codes and scales in, weights out. Nothing here quantizes.

Shapes: O = out_features, I = in_features, B = I // 32 blocks per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # weights per scale
SCALE_BIAS = 127  # e8m0: the scale byte is a power of two's exponent plus 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def value_table(device: torch.device) -> torch.Tensor:
    """FP4_VALUES as a float32 tensor on `device`, computed there from the e2m1 bits (sign, two
    exponent bits, one mantissa bit) rather than copied from the host, so it is safe to make
    while a CUDA graph is being captured."""
    code = torch.arange(16, device=device)
    exponent, mantissa = (code >> 1) & 3, (code & 1).float()
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, torch.ldexp(1 + 0.5 * mantissa, exponent - 1))
    return torch.where(code >= 8, -magnitude, magnitude)


def mxfp4_shapes(out_features: int, in_features: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name suffix -> (dtype, shape) of the tensors that store one MXFP4 [O, I] matrix."""
    return {"codes": (torch.uint8, (out_features, in_features // 2)),
            "scales": (torch.uint8, (out_features, in_features // BLOCK))}


@dataclass
class Mxfp4Matrix:
    """An MXFP4 [O, I] weight as views (into a blob, a checkpoint's tensor, or standalone)."""

    codes: torch.Tensor  # [O, I / 2] uint8, two e2m1 codes a byte, the even column in the low nibble
    scales: torch.Tensor  # [O, B] uint8, e8m0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] * 2)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[O, I] weight in `dtype`; exact in float32 and bfloat16 (a 4-bit value times a power of two)."""
        out_features, in_features = self.shape
        table = value_table(self.codes.device)
        codes = self.codes.to(torch.int64)
        values = torch.stack([table[codes & 0x0F], table[codes >> 4]], dim=-1)  # [O, I / 2, 2]: even, odd
        values = values.view(out_features, -1, BLOCK)  # [O, B, 32]
        weight = torch.ldexp(values, (self.scales.to(torch.int32) - SCALE_BIAS)[..., None])
        return weight.view(out_features, in_features).to(dtype)

    def rows(self, index: slice | torch.Tensor) -> "Mxfp4Matrix":
        """Some whole rows: reordering rows moves bytes, never a nibble, so nothing is re-encoded."""
        return Mxfp4Matrix(self.codes[index], self.scales[index])

    @staticmethod
    def stack_rows(*matrices: "Mxfp4Matrix") -> "Mxfp4Matrix":
        """One matrix of the given ones' rows, in order (w13 = [w1; w3])."""
        return Mxfp4Matrix(torch.cat([m.codes for m in matrices]), torch.cat([m.scales for m in matrices]))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.codes": self.codes, f"{prefix}.scales": self.scales}

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], prefix: str, spec=None) -> "Mxfp4Matrix":
        """`spec` is taken for QuantizedMatrix.from_tensors' shape; MXFP4 has one setting."""
        return cls(named[f"{prefix}.codes"], named[f"{prefix}.scales"])
