"""`make-synthetic`: a store with the real shapes of a model and random weights, written in
exactly the layout `pack` writes, for benchmarks. Timing does not depend on weight values;
routing does, and here it comes from random weights (say so wherever results are shown).

Values: quantized codes are uniform random; scales are set so that weights have the spread of
an initialised network (std 0.02 for inputs-side matrices) while the output-side projections
(o_proj, w2) are ten times smaller. That keeps each layer's update small against the residual
stream, as in trained models, so the next layers' routers see a hidden state much like the one
they will get: it is what makes router lookahead meaningful, and it is stated in BENCHMARKS.md.
Embedding rows have unit RMS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import ConfigError
from common.model_config import ModelConfig
from common.quantization import QuantizedMatrix, QuantSpec, bit_planes, quantized_shapes
from common.store import dense_names
from common.store.blob_layout import BlobLayout, dtype_name
from common.store.writer import StoreWriter

from ..families import mixtral
from .synthetic_shapes import SHAPES

INPUT_STD = 0.02
OUTPUT_STD = 0.002


@dataclass(frozen=True)
class SyntheticSummary:
    out: Path
    layout: BlobLayout
    config: ModelConfig

    def line(self) -> str:
        c = self.config
        total = self.layout.nbytes * c.num_layers * c.num_experts
        return (f"wrote a synthetic store to {self.out}: {c.num_layers} layers x {c.num_experts} experts, "
                f"{self.layout.nbytes / 1e6:.1f} MB per expert ({self.layout.nbytes * 8 / c.expert_parameters:.2f} bits/param), "
                f"{total / 1e9:.2f} GB of experts; weights are random (routing too)")


def hf_config_for(shape: str) -> dict:
    from transformers import MixtralConfig

    if shape not in SHAPES:
        raise ConfigError(f"--shape {shape}: choose one of {', '.join(SHAPES)}")
    config = MixtralConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return config.to_dict()


def random_bytes(shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """Uniform random uint8 (numpy's generator makes them ~5x faster than torch.randint)."""
    return torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))


def random_quantized(out_features: int, in_features: int, spec: QuantSpec, std: float, generator: torch.Generator,
                     rng: np.random.Generator) -> QuantizedMatrix:
    """Uniform random codes, zero at the middle of the code range, scales giving weights of `std`."""
    shapes = quantized_shapes(out_features, in_features, spec)
    planes = tuple(random_bytes(shapes[f"codes.p{n}"][1], rng) for n in range(len(bit_planes(spec.bits))))
    levels = 2**spec.bits
    code_std = ((levels**2 - 1) / 12) ** 0.5  # std of a uniform code
    groups = shapes["scale"][1]
    scale = (std / code_std) * (1 + 0.1 * torch.randn(groups, generator=generator)).abs()
    zero = (levels - 1) / 2 + 0.1 * torch.randn(groups, generator=generator)
    return QuantizedMatrix(planes, scale.to(torch.float16), zero.to(torch.float16), spec.bits, spec.group_size)


def random_plain(shape: tuple[int, ...], std: float, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def make_synthetic_store(*, shape: str, out: str | Path, expert_bits: int = 2, dense_bits: int = 4,
                         group_size: int = 64, seed: int = 0, progress: bool = True) -> SyntheticSummary:
    hf_config = hf_config_for(shape)
    config = mixtral.model_config(hf_config, source=f"--shape {shape}")
    if dense_bits not in (16, 4):
        raise ConfigError(f"--dense-bits {dense_bits}: choose 16 or 4")
    expert_spec, dense_spec = QuantSpec(expert_bits, group_size), QuantSpec(dense_bits, group_size)
    dtype = torch.bfloat16
    layout = BlobLayout.for_expert(config, expert_spec, dtype)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    H, F, E = config.hidden_size, config.intermediate_size, config.num_experts

    def matrix(name: str, out_features: int, in_features: int, spec: QuantSpec, std: float) -> dict[str, torch.Tensor]:
        if spec.quantized:
            return random_quantized(out_features, in_features, spec, std, generator, rng).tensors(name)
        return {name: random_plain((out_features, in_features), std, dtype, generator)}

    fields = dict(model=config, hf_config=hf_config, dtype=dtype_name(dtype), expert_quant=expert_spec,
                  dense_quant=dense_spec, layout=layout)
    with StoreWriter(out, fields) as writer:
        with tqdm(total=config.num_layers * E, desc="writing synthetic experts", unit="expert", disable=not progress) as bar:
            for layer in range(config.num_layers):
                blobs = []
                for _ in range(E):
                    tensors = {}
                    tensors.update(matrix("w13" if expert_spec.quantized else "w13.weight", 2 * F, H, expert_spec, INPUT_STD))
                    tensors.update(matrix("w2" if expert_spec.quantized else "w2.weight", H, F, expert_spec, OUTPUT_STD))
                    blobs.append(layout.pack(tensors))
                    bar.update()
                writer.write_layer(layer, blobs)
        dense = {
            dense_names.EMBED: random_plain((config.vocab_size, H), 1.0, dtype, generator),
            dense_names.LM_HEAD: random_plain((config.vocab_size, H), INPUT_STD, dtype, generator),
            dense_names.FINAL_NORM: torch.ones(H, dtype=dtype),
        }
        q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        for layer in range(config.num_layers):
            dense[dense_names.input_norm(layer)] = torch.ones(H, dtype=dtype)
            dense[dense_names.post_attention_norm(layer)] = torch.ones(H, dtype=dtype)
            dense[dense_names.router(layer)] = random_plain((E, H), INPUT_STD, dtype, generator)
            for projection, (rows, cols, std) in {
                "q_proj": (q_width, H, INPUT_STD), "k_proj": (kv_width, H, INPUT_STD),
                "v_proj": (kv_width, H, INPUT_STD), "o_proj": (H, q_width, OUTPUT_STD),
            }.items():
                dense.update(matrix(dense_names.attention(layer, projection), rows, cols, dense_spec, std))
        writer.write_dense(dense)
        writer.finish()
    return SyntheticSummary(Path(out), layout, config)
