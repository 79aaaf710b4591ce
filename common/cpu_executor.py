"""Running an expert on the CPU at memory speed: the executor that both the coordinator (experts
in its RAM) and an expert host (experts it holds) use to run an expert where it lives.

At load, each HQQ-quantized matrix of the expert (2, 3 or 4-bit codes, planar bit planes, an fp16
scale and zero per group: common/quantization.py) is repacked, exactly, for one of two kernels:
- the native one (common/cpu_kernels: C++ built on first use where it runs), NativeMatrix: 2-bit
  codes stay 2-bit, 3 and 4-bit ones become 4-bit, in tiles of 16 rows; it computes
  s * (q . x) - s * z * sum x per group in fp32, the HQQ formula w = (q - z) * s within fp32
  rounding (x as given, or rounded to int8 digits where cpu_kernels.x_digits says: then the codes
  are laid out for vpdpbusd, NativeMatrix.repack_for_digits). The default wherever it builds and runs (CpuExpert._matrix): a 2-bit expert reads half
  the bytes it reads through int4pack (0.31 bytes per weight instead of 0.56), and at 3 and 4 bits
  (the same bytes either way) it was the faster of the two on a Zen 4 at 1 to 8 tokens;
- torch's int4 weight-only matmul (`torch._weight_int4pack_mm_for_cpu`), Int4Matrix: the fallback
  (no compiler, a failed build, a shape the native kernel refuses) and MOE_EDGE_CPU_KERNEL=int4pack.
  HQQ's w = (q - z) * s is torch's (q - 8) * s + z' with z' = (8 - z) * s, and codes of fewer
  than 4 bits are 4-bit codes that leave the top bits zero; every code is read at 4 bits.
An unquantized expert keeps its matrices in the compute dtype and uses a plain matmul; so does an
MXFP4 one (common/mxfp4.py), dequantized at load: torch has no CPU matmul that reads e2m1 codes.

Knows nothing of caches, sources or the network: an ExpertWeights view in, a module out.

Shapes: T = tokens routed to the expert, H = hidden size, F = expert FFN width, G = groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .mxfp4 import Mxfp4Matrix
from .quantization import QuantizedMatrix
from .store.blob_layout import ExpertWeights

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's packed int4 kernel takes
# The native kernel's threads take 4 tiles of 16 rows at a time (64 KB of a 4096-wide 2-bit
# matrix), not one fixed share each: beside a GPU loop or a server, a thread that loses its
# core then delays its own few tiles, not the whole matrix (scripts/cpu_expert_bench.py --takes).
TILES_PER_TAKE = 4


class Int4Matrix:
    """One [O, I] HQQ matrix repacked for torch's CPU int4 weight-only matmul."""

    def __init__(self, matrix: QuantizedMatrix, dtype: torch.dtype) -> None:
        self.group_size = matrix.group_size
        self.dtype = dtype
        codes = matrix.codes().to(torch.int32)  # [O, I], each < 2**bits <= 16
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)  # [O, I / 2] uint8
        scale, zero = matrix.scale.float(), matrix.zero.float()  # [O, G]
        # [G, O, 2]: per group and output row, torch's (scale, zero) for w = (q - 8) * scale + zero
        self.scale_and_zero = torch.stack([scale.T, ((8 - zero) * scale).T], dim=-1).to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, I] -> [T, O] in the compute dtype."""
        return torch._weight_int4pack_mm_for_cpu(x.to(self.dtype), self.packed, self.group_size, self.scale_and_zero)

    @property
    def nbytes(self) -> int:
        """Bytes a call reads: the packed codes and the scales and zeros."""
        return self.packed.numel() + self.scale_and_zero.numel() * self.scale_and_zero.element_size()


class NativeMatrix:
    """One [O, I] HQQ matrix for the native kernel (common/cpu_kernels): 2-bit codes kept at 2
    bits, 3 and 4-bit ones at 4, and the fp16 scales and zeros, in one of the kernel's tile
    layouts (16 rows side by side, one vector lane each): layout 1 for x multiplied as given,
    layout 2 for x as int8 digits (hqq_matmul.cpp)."""

    TILE = 16  # rows per tile: hqq_matmul.cpp's TILE

    def __init__(self, matrix: QuantizedMatrix, dtype: torch.dtype, library, *, threads: int | None = None,
                 tiles_per_take: int = TILES_PER_TAKE, x_digits: int | None = None) -> None:
        """`threads`: the kernel's OpenMP threads (None: torch's intra-op count at each call);
        `tiles_per_take`: tiles a thread takes at a time (0: one fixed share per thread);
        `x_digits`: 0 (x as given), 1 or 2 (int8 digits); None: cpu_kernels.x_digits's choice."""
        self.library = library
        self.dtype = dtype
        self.threads, self.tiles_per_take = threads, tiles_per_take
        self.x_digits = cpu_kernels.x_digits(library, dtype == torch.bfloat16, x_digits)
        self.group_size = matrix.group_size
        self.out_features, self.in_features = matrix.shape
        self.bits = 2 if matrix.bits == 2 else 4
        repack = self.repack_for_digits if self.x_digits else self.repack
        self.codes = repack(matrix.codes(), self.bits)  # [O / 16, I / 64, 32 / p, 32] or [O / 16, I p / 32, 16, 4] uint8
        self.scale = self.tiled(matrix.scale.to(torch.float16))  # [O / 16, G, 16], owned: the blob may go
        self.zero = self.tiled(matrix.zero.to(torch.float16))  # [O / 16, G, 16]

    @classmethod
    def tiled(cls, values: torch.Tensor) -> torch.Tensor:
        """[O, G] per-row values -> [O / 16, G, 16] (rows padded with zeros to whole tiles)."""
        values, tiles = cls._whole_tiles(values)
        return values.view(tiles, cls.TILE, values.shape[1]).transpose(1, 2).contiguous()

    @classmethod
    def repack(cls, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """[O, I] codes -> the kernel's layout: per tile of 16 rows (zero codes past O) and block of
        64 columns, 32 / p chunks of 32 bytes (p = 8 / bits codes per byte), byte 2 i + e of chunk c
        holding row i's columns 2 (p c + j) + e at bit bits * j."""
        per_byte = 8 // bits
        codes, tiles = cls._whole_tiles(codes.to(torch.uint8))
        blocks, chunks = codes.shape[1] // 64, 32 // per_byte
        # [tile, i, block, c, j, e] -> [tile, block, c, j, i, e]
        codes = codes.view(tiles, cls.TILE, blocks, chunks, per_byte, 2).permute(0, 2, 3, 4, 1, 5)
        return cls._shared_bytes(codes, bits, dim=3).reshape(tiles, blocks, chunks, 2 * cls.TILE)

    @classmethod
    def repack_for_digits(cls, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """[O, I] codes -> layout 2: per tile of 16 rows (zero codes past O) and block of 32 / bits
        columns, 64 bytes, dword i row i's, its byte k holding columns 4 j + k at bit bits * j."""
        per_byte = 8 // bits
        codes, tiles = cls._whole_tiles(codes.to(torch.uint8))
        blocks = codes.shape[1] // (4 * per_byte)
        # [tile, i, block, j, k] -> [tile, block, i, k, j]
        codes = codes.view(tiles, cls.TILE, blocks, per_byte, 4).permute(0, 2, 1, 4, 3)
        return cls._shared_bytes(codes, bits, dim=-1).contiguous()

    @classmethod
    def _whole_tiles(cls, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """[O, n] per-row values with zero rows added up to whole tiles of 16; and the tile count."""
        tiles = -(-rows.shape[0] // cls.TILE)
        return F.pad(rows, (0, 0, 0, tiles * cls.TILE - rows.shape[0])), tiles

    @staticmethod
    def _shared_bytes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
        """The codes along `dim` (8 / bits of them) put into one byte, the j-th at bit bits * j."""
        packed = codes.select(dim, 0).clone()
        for j in range(1, codes.shape[dim]):
            packed |= codes.select(dim, j) << (bits * j)
        return packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, I] -> [T, O] in the compute dtype (fp32 arithmetic; bf16 x is widened exactly, or
        rounded to int8 digits where x_digits says)."""
        if x.dtype != torch.bfloat16:
            x = x.to(torch.float32)
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        status = self.library.hqq_matmul(self.codes.data_ptr(), self.scale.data_ptr(), self.zero.data_ptr(), self.bits,
                                         self.group_size, self.out_features, self.in_features, x.data_ptr(),
                                         int(x.dtype == torch.bfloat16), x.shape[0], y.data_ptr(),
                                         self.threads or torch.get_num_threads(), self.tiles_per_take, self.x_digits)
        assert status == 0, "NativeMatrix was made for a shape the kernel refuses"
        return y.to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes a call reads: the codes and the fp16 scales and zeros."""
        return self.codes.numel() + 2 * self.scale.numel() * self.scale.element_size()


class PlainMatrix:
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.weight = weight.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def can_run_native(matrix: QuantizedMatrix) -> bool:
    out_features, in_features = matrix.shape
    return matrix.bits <= 4 and matrix.group_size % 64 == 0 and in_features % matrix.group_size == 0


def can_run_int4(matrix: QuantizedMatrix) -> bool:
    out_features, in_features = matrix.shape
    return matrix.bits <= 4 and matrix.group_size in INT4_GROUP_SIZES and in_features % matrix.group_size == 0


class CpuExpert:
    """One expert's FFN, activation(x W13 + b13) W2 + b2 (Mixtral's: SiLU(x W1) * (x W3), no
    biases; the activation and biases come with the weights, as in common/expert_ffn.py), ready
    to run on the CPU."""

    def __init__(self, weights: ExpertWeights, *, dtype: torch.dtype = torch.bfloat16, kernel: str | None = None,
                 threads: int | None = None, tiles_per_take: int = TILES_PER_TAKE, x_digits: int | None = None) -> None:
        """kernel: "native", "int4pack" or "auto" for quantized matrices (common/cpu_kernels);
        None reads $MOE_EDGE_CPU_KERNEL. `threads`, `tiles_per_take` and `x_digits`: the native
        kernel's (NativeMatrix); torch's own matmuls use torch's threads."""
        self.dtype = dtype
        self.kernel = kernel
        self.threads, self.tiles_per_take, self.x_digits = threads, tiles_per_take, x_digits
        self.w13 = self._matrix(weights.w13)  # [2F, H]: gate and up
        self.w2 = self._matrix(weights.w2)  # [H, F]
        self.b13 = None if weights.b13 is None else weights.b13.to(dtype)  # [2F]
        self.b2 = None if weights.b2 is None else weights.b2.to(dtype)  # [H]
        self.activation = weights.activation

    def _matrix(self, weight) -> NativeMatrix | Int4Matrix | PlainMatrix:
        if isinstance(weight, QuantizedMatrix):
            # The native kernel wherever it can run: a 2-bit Mixtral-8x7B expert took 1.27 ms on it
            # against 7.00 ms through int4pack on the H200 machine's 16-core host, a 4-bit one 1.32
            # against 1.55 (scripts/cpu_expert_bench.py, 2026-12-01); on one Zen 4 thread 3.7 against
            # 10.8 ms and 5.0-5.7 against 10.1-12.0. MOE_EDGE_CPU_KERNEL=int4pack: torch's instead.
            library = cpu_kernels.native_library(self.kernel) if can_run_native(weight) else None
            if library is not None:
                return NativeMatrix(weight, self.dtype, library, threads=self.threads, tiles_per_take=self.tiles_per_take,
                                    x_digits=self.x_digits)
            if can_run_int4(weight):
                return Int4Matrix(weight, self.dtype)
            return PlainMatrix(weight.dequantize(torch.float32), self.dtype)  # a group size torch's kernel lacks
        if isinstance(weight, Mxfp4Matrix):
            return PlainMatrix(weight.dequantize(torch.float32), self.dtype)
        return PlainMatrix(weight, self.dtype)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in the compute dtype."""
        gate_up = self.w13(x)  # [T, 2F]
        if self.b13 is not None:
            gate_up = gate_up + self.b13
        out = self.w2(self.activation(gate_up))  # [T, H]
        return out if self.b2 is None else out + self.b2

    @property
    def nbytes(self) -> int:
        """Bytes one call reads (what memory bandwidth bounds)."""
        return self.w13.nbytes + self.w2.nbytes


def run_experts(x: torch.Tensor, experts: list[CpuExpert], weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of several experts on the same tokens: x [T, H], weights [T, n] -> [T, H]
    float32 (what one RunExpert call per layer returns)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for n, expert in enumerate(experts):
        out += expert(x).float() * weights[:, n : n + 1].float()
    return out
