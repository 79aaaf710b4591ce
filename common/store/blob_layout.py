"""Where each tensor of an expert lives inside its one contiguous byte blob.

One layout serves every expert of a model, so a transfer is one copy, a GPU cache slot is one
preallocated buffer, and `views()` gives the expert's tensors over any buffer without copying.
The expert's matrices, as Mixtral names them: w13 = [w1; w3] (gate and up, [2F, H]) and
w2 (down, [H, F]); F = intermediate_size, H = hidden_size. A model whose experts have biases
(GPT-OSS) adds w13.bias [2F] and w2.bias [H], kept in the weight dtype even when the matrices are
quantized. A matrix is plain (`w13.weight`), HQQ (`w13.codes.p0`, `w13.scale`, `w13.zero`) or, for a
checkpoint that stores MXFP4 experts, MXFP4 as read (`w13.codes`, `w13.scales`: common/mxfp4.py); the layout also names the activation between the matrices (common/expert_activation.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import StoreError
from ..expert_activation import ExpertActivation
from ..model_config import ModelConfig
from ..mxfp4 import Mxfp4Matrix, mxfp4_shapes
from ..quantization import QuantizedMatrix, QuantSpec, quantized_shapes

ALIGN = 256  # every tensor starts on a 256-byte boundary: aligned vector loads, valid dtype views

DTYPES = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise StoreError(f"dtype {dtype} cannot be stored")


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


@dataclass(frozen=True)
class ExpertWeights:
    """An expert's two matrices: plain tensors (16-bit store), QuantizedMatrix or Mxfp4Matrix
    views; their biases where the model has them, and the activation between them."""

    w13: torch.Tensor | QuantizedMatrix | Mxfp4Matrix  # [2F, H]
    w2: torch.Tensor | QuantizedMatrix | Mxfp4Matrix  # [H, F]
    b13: torch.Tensor | None = None  # [2F]
    b2: torch.Tensor | None = None  # [H]
    activation: ExpertActivation = ExpertActivation()


@dataclass(frozen=True)
class BlobLayout:
    slots: tuple[TensorSlot, ...]
    nbytes: int
    spec: QuantSpec
    weight_dtype: str  # dtype of unquantized (16-bit) expert weights
    activation: ExpertActivation = ExpertActivation()

    @classmethod
    def for_expert(cls, config: ModelConfig, spec: QuantSpec, weight_dtype: torch.dtype) -> "BlobLayout":
        hidden, ffn = config.hidden_size, config.intermediate_size
        matrices = {"w13": (2 * ffn, hidden), "w2": (hidden, ffn)}
        spec.check_fits(hidden, what="w1/w3 (hidden_size)")
        spec.check_fits(ffn, what="w2 (intermediate_size)")
        slots, offset = [], 0
        for prefix, (out_features, in_features) in matrices.items():
            if spec.is_mxfp4:
                parts = {f"{prefix}.{k}": v for k, v in mxfp4_shapes(out_features, in_features).items()}
            elif spec.quantized:
                parts = {f"{prefix}.{k}": v for k, v in quantized_shapes(out_features, in_features, spec).items()}
            else:
                parts = {f"{prefix}.weight": (weight_dtype, (out_features, in_features))}
            if config.expert_bias:
                parts[f"{prefix}.bias"] = (weight_dtype, (out_features,))
            for name, (dtype, shape) in parts.items():
                slot = TensorSlot(name, dtype_name(dtype), tuple(shape), offset)
                slots.append(slot)
                offset = _align(offset + slot.nbytes)
        return cls(tuple(slots), offset, spec, dtype_name(weight_dtype), ExpertActivation.of(config))

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy named tensors into one new uint8 blob of this layout (padding is zero)."""
        blob = torch.zeros(self.nbytes, dtype=torch.uint8)
        for slot in self.slots:
            tensor = tensors[slot.name]
            if tuple(tensor.shape) != slot.shape or dtype_name(tensor.dtype) != slot.dtype:
                raise StoreError(f"tensor {slot.name}: got {tuple(tensor.shape)} {tensor.dtype}, layout wants {slot.shape} {slot.dtype}")
            blob[slot.offset : slot.offset + slot.nbytes] = tensor.contiguous().view(-1).view(torch.uint8)
        return blob

    def views(self, blob: torch.Tensor) -> ExpertWeights:
        """The expert's matrices as views over `blob` (any device); no copies."""
        named = {
            slot.name: blob[slot.offset : slot.offset + slot.nbytes].view(DTYPES[slot.dtype]).view(slot.shape)
            for slot in self.slots
        }
        extras = dict(b13=named.get("w13.bias"), b2=named.get("w2.bias"), activation=self.activation)
        if self.spec.quantized:
            matrix = Mxfp4Matrix if self.spec.is_mxfp4 else QuantizedMatrix
            return ExpertWeights(
                matrix.from_tensors(named, "w13", self.spec),
                matrix.from_tensors(named, "w2", self.spec),
                **extras,
            )
        return ExpertWeights(named["w13.weight"], named["w2.weight"], **extras)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "nbytes": self.nbytes,
            "align": ALIGN,
            "quantization": self.spec.to_dict(),
            "weight_dtype": self.weight_dtype,
            "tensors": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "offset": s.offset} for s in self.slots
            ],
        }
        if not self.activation.is_default:  # left out at the default, so older stores keep their model_id
            data["activation"] = self.activation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlobLayout":
        slots = tuple(TensorSlot(t["name"], t["dtype"], tuple(t["shape"]), t["offset"]) for t in data["tensors"])
        spec = QuantSpec(**data["quantization"])
        activation = ExpertActivation(**data["activation"]) if "activation" in data else ExpertActivation()
        return cls(slots, data["nbytes"], spec, data["weight_dtype"], activation)
