"""`make-synthetic`: a store with the real shapes of a model and random weights, written in
exactly the layout `pack` writes, for benchmarks. Timing does not depend on weight values;
routing does, and here it comes from random weights (say so wherever results are shown).

Any family of coordinator/families/ can be written: the shape (synthetic_shapes.py) names its
family and gives its Hugging Face config, the family module turns that into the store's
ModelConfig (as pack does), and the dense tensors written are the ones that config calls for
(q/k norms, attention biases, router biases, shared experts, dense layers' FFNs, latent
attention's projections, attention sinks). Experts are written for the MoE layers only, in the
format the shape's published checkpoint implies (HQQ at `expert_bits`, or GPT-OSS's MXFP4 as pack
keeps it), with their biases where the family has them. `plan_synthetic_store` says what a store
would hold and weigh without writing it. `layers` cuts the model to its first layers, keeping the
family's dense-layer rule, for models whose store would not fit a disk.

Values: quantized codes are uniform random; scales are set so that weights have the spread of
an initialised network (std 0.02 for inputs-side matrices) while the output-side projections
(o_proj, w2) are ten times smaller. That keeps each layer's update small against the residual
stream, as in trained models, so the next layers' routers see a hidden state much like the one
they will get: it is what makes router lookahead meaningful, and it is stated in BENCHMARKS.md.
Embedding rows have unit RMS, norms are ones, biases small. MXFP4 codes are uniform random with
one power-of-two scale per matrix giving the same spreads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import ConfigError
from common.model_config import ModelConfig
from common.mxfp4 import BLOCK, FP4_VALUES, SCALE_BIAS, Mxfp4Matrix
from common.quantization import QuantizedMatrix, QuantSpec, bit_planes, quantized_shapes
from common.store import dense_names
from common.store.blob_layout import BlobLayout, dtype_name
from common.store.writer import StoreWriter

from ..families import family_for
from .synthetic_shapes import layers_kept, shape_named

INPUT_STD = 0.02
OUTPUT_STD = 0.002
BIAS_STD = 0.002  # attention, router and expert biases: small next to the scores they shift
SINK_STD = 1.0  # attention sinks: logits of the order of the attention scores they join


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
        spec = self.layout.spec
        how = ("MXFP4 as published" if spec.is_mxfp4 else f"{spec.bits}-bit HQQ" if spec.quantized
               else self.layout.weight_dtype)
        return (f"wrote a synthetic store to {self.out}: {layers}{cut}, "
                f"{self.layout.nbytes / 1e6:.1f} MB per expert ({how}, {self.layout.nbytes * 8 / c.expert_parameters:.2f} bits/param), "
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
        if config.attention == "latent":
            plan += latent_attention_plan(config, layer)
        else:
            for projection, shape, std in (("q_proj", (q_width, H), INPUT_STD), ("k_proj", (kv_width, H), INPUT_STD),
                                           ("v_proj", (kv_width, H), INPUT_STD), ("o_proj", (H, q_width), OUTPUT_STD)):
                plan.append(DenseTensor(dense_names.attention(layer, projection), shape, std, attention=True))
        if config.output_bias:
            plan.append(DenseTensor(dense_names.attention_bias(layer, "o_proj"), (H,), BIAS_STD))
        if config.attention_sinks:
            plan.append(DenseTensor(dense_names.attention_sinks(layer), (config.num_heads,), SINK_STD))
        if config.router == "topk_softmax":
            plan.append(DenseTensor(dense_names.router_logit_bias(layer), (E,), BIAS_STD))
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


def latent_attention_plan(config: ModelConfig, layer: int) -> list[DenseTensor]:
    """Multi-head latent attention's tensors (latent_attention.LatentWeights): only o_proj is an
    attention projection that --dense-bits quantizes, as in pack."""
    H, heads = config.hidden_size, config.num_heads
    q_width = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)

    def part(name: str, shape: tuple[int, ...], std: float | None) -> DenseTensor:
        return DenseTensor(dense_names.latent_attention(layer, name), shape, std)

    if config.q_lora_rank is not None:
        plan = [part("q_a_proj", (config.q_lora_rank, H), INPUT_STD), part("q_a_norm", (config.q_lora_rank,), None),
                part("q_b_proj", (q_width, config.q_lora_rank), INPUT_STD)]
    else:
        plan = [part("q_proj", (q_width, H), INPUT_STD)]
    plan += [part("kv_a_proj", (config.kv_lora_rank + config.qk_rope_head_dim, H), INPUT_STD),
             part("kv_a_norm", (config.kv_lora_rank,), None),
             part("kv_b_proj", (heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank), INPUT_STD),
             DenseTensor(dense_names.attention(layer, "o_proj"), (H, heads * config.v_head_dim), OUTPUT_STD,
                         attention=True)]
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
    """Uniform random uint8: the bit generator's raw 64-bit words seen as bytes (2.4 GB/s, 9x
    rng.integers; writing a Mixtral-8x7B store was bound by it)."""
    count = math.prod(shape)
    words = rng.bit_generator.random_raw((count + 7) // 8).view(np.uint8)
    return torch.from_numpy(words[:count].reshape(shape))


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


def random_mxfp4(out_features: int, in_features: int, std: float, rng: np.random.Generator) -> Mxfp4Matrix:
    """Uniform random e2m1 codes with the power-of-two scale (the same for every block) nearest to
    giving weights of `std`."""
    code_std = (sum(v * v for v in FP4_VALUES) / len(FP4_VALUES)) ** 0.5  # of a uniform code; the mean is 0
    exponent = round(math.log2(std / code_std)) + SCALE_BIAS
    scales = torch.full((out_features, in_features // BLOCK), exponent, dtype=torch.uint8)
    return Mxfp4Matrix(random_bytes((out_features, in_features // 2), rng), scales)


def random_plain(shape: tuple[int, ...], std: float, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std).to(dtype)


@dataclass(frozen=True)
class SyntheticPlan:
    """What a synthetic store holds and weighs, known before anything is written."""

    shape: str
    hf_config: dict
    config: ModelConfig
    expert_spec: QuantSpec
    dense_spec: QuantSpec
    dtype: torch.dtype
    layout: BlobLayout
    dense: list[DenseTensor]

    @property
    def experts(self) -> int:
        return len(self.config.moe_layers) * self.config.num_experts

    @property
    def layer_bytes(self) -> int:
        """The blobs of one MoE layer (its experts file, less the safetensors header)."""
        return self.layout.nbytes * self.config.num_experts

    @property
    def dense_bytes(self) -> int:
        return dense_nbytes(self.dense, self.dense_spec, self.dtype)

    @property
    def store_bytes(self) -> int:
        """As pack reckons it: blobs, dense weights, and room for headers, the manifest and file blocks."""
        return (self.layout.nbytes * self.experts + self.dense_bytes
                + 64 * 1024 + 512 * self.experts + 4096 * (self.config.num_layers + 2))

    def manifest_fields(self) -> dict:
        """The fields StoreWriter writes into the manifest (all but the checksums)."""
        return dict(model=self.config, hf_config=self.hf_config, dtype=dtype_name(self.dtype),
                    expert_quant=self.expert_spec, dense_quant=self.dense_spec, layout=self.layout)


def plan_synthetic_store(*, shape: str, expert_bits: int | None = None, dense_bits: int = 4, group_size: int = 64,
                         layers: int | None = None) -> SyntheticPlan:
    """The store `make_synthetic_store` would write for these settings, from shapes alone.
    `expert_bits` None: the shape's published format (MXFP4 for GPT-OSS, else 2-bit HQQ); a width
    gives HQQ experts at it (16: bf16), as pack writes them from a bf16 checkpoint."""
    hf_config = hf_config_for(shape, layers)
    source = f"--shape {shape}"
    config = family_for(hf_config, source=source).model_config(hf_config, source=source)
    if not config.moe_layers:
        raise ConfigError(f"--layers {layers}: the first {layers} layers of {shape} are all dense; "
                          f"keep at least {len(config.dense_layers) + 1} so the store has experts")
    if dense_bits not in (16, 4):
        raise ConfigError(f"--dense-bits {dense_bits}: choose 16 or 4")
    if expert_bits is None:
        expert_spec = QuantSpec.mxfp4() if shape_named(shape).expert_format == "mxfp4" else QuantSpec(2, group_size)
    else:
        expert_spec = QuantSpec(expert_bits, group_size)
    dense_spec = QuantSpec(dense_bits, group_size)
    dtype = torch.bfloat16
    layout = BlobLayout.for_expert(config, expert_spec, dtype)
    plan = dense_plan(config)
    for tensor in plan:
        if tensor.attention:
            dense_spec.check_fits(tensor.shape[1], what=tensor.name)
    return SyntheticPlan(shape, hf_config, config, expert_spec, dense_spec, dtype, layout, plan)


def make_synthetic_store(*, shape: str, out: str | Path, expert_bits: int | None = None, dense_bits: int = 4,
                         group_size: int = 64, layers: int | None = None, seed: int = 0,
                         progress: bool = True) -> SyntheticSummary:
    """Write the store of `shape` (cut to its first `layers` layers when given) with random
    weights; `expert_bits` as plan_synthetic_store takes it."""
    plan = plan_synthetic_store(shape=shape, expert_bits=expert_bits, dense_bits=dense_bits, group_size=group_size,
                                layers=layers)
    config, expert_spec, dense_spec, dtype, layout = plan.config, plan.expert_spec, plan.dense_spec, plan.dtype, plan.layout
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    H, F, E = config.hidden_size, config.intermediate_size, config.num_experts

    def matrix(name: str, out_features: int, in_features: int, spec: QuantSpec, std: float) -> dict[str, torch.Tensor]:
        if spec.is_mxfp4:
            return random_mxfp4(out_features, in_features, std, rng).tensors(name)
        if spec.quantized:
            return random_quantized(out_features, in_features, spec, std, generator, rng).tensors(name)
        return {name: random_plain((out_features, in_features), std, dtype, generator)}

    def expert() -> dict[str, torch.Tensor]:
        tensors = {}
        tensors.update(matrix("w13" if expert_spec.quantized else "w13.weight", 2 * F, H, expert_spec, INPUT_STD))
        tensors.update(matrix("w2" if expert_spec.quantized else "w2.weight", H, F, expert_spec, OUTPUT_STD))
        if config.expert_bias:
            tensors["w13.bias"] = random_plain((2 * F,), BIAS_STD, dtype, generator)
            tensors["w2.bias"] = random_plain((H,), BIAS_STD, dtype, generator)
        return tensors

    with StoreWriter(out, plan.manifest_fields(), expected_bytes=plan.store_bytes) as writer:
        with tqdm(total=plan.experts, desc="writing synthetic experts", unit="expert", disable=not progress) as bar:
            for layer in config.moe_layers:
                blobs = []
                for _ in range(E):
                    blobs.append(layout.pack(expert()))
                    bar.update()
                writer.write_layer(layer, blobs)
        dense = {}
        for tensor in plan.dense:
            if tensor.std is None:
                dense[tensor.name] = torch.ones(tensor.shape, dtype=dtype)
            elif tensor.attention:
                dense.update(matrix(tensor.name, *tensor.shape, dense_spec, tensor.std))
            else:
                dense[tensor.name] = random_plain(tensor.shape, tensor.std, dtype, generator)
        writer.write_dense(dense)
        writer.finish()
    return SyntheticSummary(Path(out), layout, config, shape_named(shape).num_layers)
