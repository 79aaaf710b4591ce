"""`make-synthetic`: a store with the real shapes of a model and random weights, written in
exactly the layout `pack` writes, for benchmarks. Timing does not depend on weight values;
routing does, and here it comes from random weights (say so wherever results are shown).

Any family of coordinator/families/ can be written: the shape (synthetic_shapes.py) names its
family and gives its Hugging Face config, the family module turns that into the store's
ModelConfig (as pack does), and the dense tensors written are the ones that config calls for
(q/k norms, attention biases, router biases, shared experts, dense layers' FFNs). Experts are
written for the MoE layers only. `layers` cuts the model to its first layers, keeping the
family's dense-layer rule, for models whose store would not fit a disk.

Values: quantized codes are uniform random; scales are set so that weights have the spread of
an initialised network (std 0.02 for inputs-side matrices) while the output-side projections
(o_proj, w2) are ten times smaller. That keeps each layer's update small against the residual
stream, as in trained models, so the next layers' routers see a hidden state much like the one
they will get: it is what makes router lookahead meaningful, and it is stated in BENCHMARKS.md.
Embedding rows have unit RMS, norms are ones, biases small."""

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

from ..families import family_for
from .synthetic_shapes import layers_kept, shape_named

INPUT_STD = 0.02
OUTPUT_STD = 0.002
BIAS_STD = 0.002  # attention and router biases: small next to the scores they shift


@dataclass(frozen=True)
class SyntheticSummary:
    out: Path
    layout: BlobLayout
    config: ModelConfig
    full_layers: int  # the shape's layers; more than config.num_layers when the store is cut

    def line(self) -> str:
        c = self.config
        experts = len(c.moe_layers) * c.num_experts
        layers = (f"{c.num_layers} layers ({len(c.moe_layers)} with {c.num_experts} experts)" if c.dense_layers
                  else f"{c.num_layers} layers x {c.num_experts} experts")
        cut = ""
        if c.num_layers < self.full_layers:
            cut = (f" (cut: first {c.num_layers} of {self.full_layers} layers; per-layer figures only: "
                   "benchmark figures of a cut model are per layer, not the whole model's)")
        return (f"wrote a synthetic store to {self.out}: {layers}{cut}, "
                f"{self.layout.nbytes / 1e6:.1f} MB per expert ({self.layout.nbytes * 8 / c.expert_parameters:.2f} bits/param), "
                f"{self.layout.nbytes * experts / 1e9:.2f} GB of experts; weights are random (routing too)")


def hf_config_for(shape: str, layers: int | None = None) -> dict:
    """The shape's config.json as its family's transformers config writes it, cut to `layers`."""
    from transformers import AutoConfig

    spec = shape_named(shape)
    fields = dict(spec.config, num_hidden_layers=layers_kept(shape, layers))
    config = AutoConfig.for_model(spec.family, **fields, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return config.to_dict()


@dataclass(frozen=True)
class DenseTensor:
    """One dense tensor to write: its store name, shape and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    std: float | None  # None: ones (a norm)
    attention: bool = False  # an attention projection: quantized when the dense spec says so


def dense_plan(config: ModelConfig) -> list[DenseTensor]:
    """Every dense tensor the config's store needs, in the order they are drawn. Mixtral's come
    first in each layer, in the order synthetic stores have always drawn them, so a seed still
    gives the same Mixtral store."""
    H, E = config.hidden_size, config.num_experts
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    plan = [DenseTensor(dense_names.EMBED, (config.vocab_size, H), 1.0)]
    if not config.tie_word_embeddings:
        plan.append(DenseTensor(dense_names.LM_HEAD, (config.vocab_size, H), INPUT_STD))
    plan.append(DenseTensor(dense_names.FINAL_NORM, (H,), None))
    dense_layers = set(config.dense_layers)
    for layer in range(config.num_layers):
        plan += [DenseTensor(dense_names.input_norm(layer), (H,), None),
                 DenseTensor(dense_names.post_attention_norm(layer), (H,), None)]
        if layer not in dense_layers:
            plan.append(DenseTensor(dense_names.router(layer), (E, H), INPUT_STD))
        for projection, shape, std in (("q_proj", (q_width, H), INPUT_STD), ("k_proj", (kv_width, H), INPUT_STD),
                                       ("v_proj", (kv_width, H), INPUT_STD), ("o_proj", (H, q_width), OUTPUT_STD)):
            plan.append(DenseTensor(dense_names.attention(layer, projection), shape, std, attention=True))
        if config.attention_bias:
            for projection, width in (("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)):
                plan.append(DenseTensor(dense_names.attention_bias(layer, projection), (width,), BIAS_STD))
        if config.qk_norm != "none":
            per_head = config.qk_norm == "head"
            plan += [DenseTensor(dense_names.q_norm(layer), (config.head_dim if per_head else q_width,), None),
                     DenseTensor(dense_names.k_norm(layer), (config.head_dim if per_head else kv_width,), None)]
        if layer in dense_layers:
            plan += gated_ffn_plan(dense_names.dense_ffn, layer, config.dense_intermediate_size, H)
            continue
        if config.router_bias:
            plan.append(DenseTensor(dense_names.router_bias(layer), (E,), BIAS_STD))
        if config.shared_expert_intermediate_size:
            plan += gated_ffn_plan(dense_names.shared_expert, layer, config.shared_expert_intermediate_size, H)
            if config.shared_expert_gate:
                plan.append(DenseTensor(dense_names.shared_expert_gate(layer), (1, H), INPUT_STD))
    return plan


def gated_ffn_plan(name_of, layer: int, width: int, hidden: int) -> list[DenseTensor]:
    """w13 = [gate; up] [2F, H] (input side) and w2 = down [H, F] (output side) of a dense FFN."""
    return [DenseTensor(name_of(layer, "w13"), (2 * width, hidden), INPUT_STD),
            DenseTensor(name_of(layer, "w2"), (hidden, width), OUTPUT_STD)]


def dense_nbytes(plan: list[DenseTensor], spec: QuantSpec, dtype: torch.dtype) -> int:
    """What the plan's tensors take in dense.safetensors, from shapes alone."""
    total = 0
    for tensor in plan:
        if tensor.attention and spec.quantized:
            parts = quantized_shapes(*tensor.shape, spec).values()
            total += sum(torch.empty(shape, dtype=part_dtype, device="meta").nbytes for part_dtype, shape in parts)
        else:
            total += torch.empty(tensor.shape, dtype=dtype, device="meta").nbytes
    return total


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
                         group_size: int = 64, layers: int | None = None, seed: int = 0,
                         progress: bool = True) -> SyntheticSummary:
    """Write the store of `shape` (cut to its first `layers` layers when given) with random weights."""
    hf_config = hf_config_for(shape, layers)
    source = f"--shape {shape}"
    config = family_for(hf_config, source=source).model_config(hf_config, source=source)
    if not config.moe_layers:
        raise ConfigError(f"--layers {layers}: the first {layers} layers of {shape} are all dense; "
                          f"keep at least {len(config.dense_layers) + 1} so the store has experts")
    if dense_bits not in (16, 4):
        raise ConfigError(f"--dense-bits {dense_bits}: choose 16 or 4")
    expert_spec, dense_spec = QuantSpec(expert_bits, group_size), QuantSpec(dense_bits, group_size)
    dtype = torch.bfloat16
    layout = BlobLayout.for_expert(config, expert_spec, dtype)
    plan = dense_plan(config)
    for tensor in plan:
        if tensor.attention:
            dense_spec.check_fits(tensor.shape[1], what=tensor.name)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    H, F, E = config.hidden_size, config.intermediate_size, config.num_experts
    experts = len(config.moe_layers) * E
    # As pack reckons it: blobs, dense weights, and room for headers, the manifest and file blocks.
    expected = (layout.nbytes * experts + dense_nbytes(plan, dense_spec, dtype)
                + 64 * 1024 + 512 * experts + 4096 * (config.num_layers + 2))

    def matrix(name: str, out_features: int, in_features: int, spec: QuantSpec, std: float) -> dict[str, torch.Tensor]:
        if spec.quantized:
            return random_quantized(out_features, in_features, spec, std, generator, rng).tensors(name)
        return {name: random_plain((out_features, in_features), std, dtype, generator)}

    fields = dict(model=config, hf_config=hf_config, dtype=dtype_name(dtype), expert_quant=expert_spec,
                  dense_quant=dense_spec, layout=layout)
    with StoreWriter(out, fields, expected_bytes=expected) as writer:
        with tqdm(total=experts, desc="writing synthetic experts", unit="expert", disable=not progress) as bar:
            for layer in config.moe_layers:
                blobs = []
                for _ in range(E):
                    tensors = {}
                    tensors.update(matrix("w13" if expert_spec.quantized else "w13.weight", 2 * F, H, expert_spec, INPUT_STD))
                    tensors.update(matrix("w2" if expert_spec.quantized else "w2.weight", H, F, expert_spec, OUTPUT_STD))
                    blobs.append(layout.pack(tensors))
                    bar.update()
                writer.write_layer(layer, blobs)
        dense = {}
        for tensor in plan:
            if tensor.std is None:
                dense[tensor.name] = torch.ones(tensor.shape, dtype=dtype)
            elif tensor.attention:
                dense.update(matrix(tensor.name, *tensor.shape, dense_spec, tensor.std))
            else:
                dense[tensor.name] = random_plain(tensor.shape, tensor.std, dtype, generator)
        writer.write_dense(dense)
        writer.finish()
    return SyntheticSummary(Path(out), layout, config, shape_named(shape).num_layers)
