"""`pack`: a Hugging Face checkpoint (a folder, or a repo id read through the hub cache:
coordinator/tools/hub_checkpoint.py) -> a moe-edge store (docs/architecture.md, "The store").

Each expert is HQQ-quantized (or kept in the checkpoint's dtype at 16 bits) and written as one
blob; a checkpoint whose experts are MXFP4 (GPT-OSS's published ones) keeps them as stored, bytes
unchanged, whatever --expert-bits says; FP8 block weights (DeepSeek-V3's published checkpoints)
are dequantized as they are read (tools/fp8_blocks.py) and then stored like any other; attention projections are optionally quantized too; routers, norms, embeddings and the
LM head stay in the checkpoint's dtype.

Before any packing work the destination is checked (common/store/writer.py) and the store's size
is compared with the free space; partial folders left by killed packs are named on stderr. NaN or
Inf weights are refused as they are read (coordinator/tools/checkpoint.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.errors import ConfigError
from common.mxfp4 import Mxfp4Matrix
from common.quantization import QuantSpec, quantize_matrix, quantized_shapes
from common.store import dense_names, partial_folder
from common.store.blob_layout import BlobLayout, dtype_name
from common.store.manifest import Manifest
from common.store.partial_folder import size_text
from common.store.writer import StoreWriter, check_out_folder, store_path

from .checkpoint import HFCheckpoint
from .hub_checkpoint import HubSettings, checkpoint_folder


@dataclass(frozen=True)
class PackSummary:
    out: Path
    manifest: Manifest
    expert_bytes: int
    dense_bytes: int

    def line(self) -> str:
        model, layout = self.manifest.model, self.manifest.layout
        bits = layout.nbytes * 8 / model.expert_parameters
        quant = self.manifest.expert_quant
        how = ("MXFP4 as stored" if quant.is_mxfp4 else f"{quant.bits}-bit HQQ, group {quant.group_size}"
               if quant.quantized else self.manifest.dtype)
        layers = (f"{model.num_layers} layers ({len(model.moe_layers)} with {model.num_experts} experts)" if model.dense_layers
                  else f"{model.num_layers} layers x {model.num_experts} experts")
        return (
            f"packed {layers} into {self.out}: "
            f"experts {size_text(self.expert_bytes)} ({how}, {bits:.2f} bits/param, {size_text(layout.nbytes)} each), "
            f"dense {size_text(self.dense_bytes)}"
        )


def expert_tensors(w1: torch.Tensor | Mxfp4Matrix, w3: torch.Tensor | Mxfp4Matrix, w2: torch.Tensor | Mxfp4Matrix,
                   spec: QuantSpec, biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Named tensors of one expert for BlobLayout.pack: w13 = [w1; w3] and w2, quantized or not
    (MXFP4 matrices are kept as they are), and their biases (b13 = [b1; b3], b2; never quantized)
    where the model has them."""
    if spec.is_mxfp4:
        tensors = {**Mxfp4Matrix.stack_rows(w1, w3).tensors("w13"), **w2.tensors("w2")}
        if biases is not None:
            tensors["w13.bias"], tensors["w2.bias"] = biases
        return tensors
    w13 = torch.cat([w1, w3], dim=0)
    if not spec.quantized:
        tensors = {"w13.weight": w13, "w2.weight": w2}
    else:
        tensors = {**quantize_matrix(w13, spec).tensors("w13"), **quantize_matrix(w2, spec).tensors("w2")}
    if biases is not None:
        tensors["w13.bias"], tensors["w2.bias"] = biases
    return tensors


def dense_tensors(checkpoint: HFCheckpoint, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The family's dense tensors, with the attention projections quantized when `spec` says so."""
    tensors = {}
    for name, weight in checkpoint.family.dense_tensors(checkpoint).items():
        if spec.quantized and dense_names.is_attention(name):
            spec.check_fits(weight.shape[1], what=name)
            tensors.update(quantize_matrix(weight, spec).tensors(name))
        else:
            tensors[name] = weight
    return tensors


def expected_dense_bytes(checkpoint: HFCheckpoint, spec: QuantSpec) -> int:
    """What dense_tensors() will write, in bytes, learned from shapes alone (nothing is read)."""
    total = 0
    for name, weight in checkpoint.family.dense_tensors(checkpoint.shape_view()).items():
        if spec.quantized and dense_names.is_attention(name):
            spec.check_fits(weight.shape[1], what=name)
            parts = quantized_shapes(weight.shape[0], weight.shape[1], spec).values()
            total += sum(torch.empty(shape, dtype=dtype, device="meta").nbytes for dtype, shape in parts)
        else:
            total += weight.nbytes
    return total


def expected_store_bytes(checkpoint: HFCheckpoint, layout: BlobLayout, dense_spec: QuantSpec) -> int:
    """The store's size on disk: expert blobs, dense weights, copied files, plus room for the
    safetensors headers, the manifest (one line per expert) and a filesystem block per file."""
    config = checkpoint.config
    experts = len(config.moe_layers) * config.num_experts
    copied = [checkpoint.folder / "config.json", *checkpoint.tokenizer_files()]
    files = config.num_layers + 2 + len(copied)
    overhead = 64 * 1024 + 512 * experts + 4096 * files
    return (layout.nbytes * experts + expected_dense_bytes(checkpoint, dense_spec)
            + sum(path.stat().st_size for path in copied) + overhead)


def stored_expert_spec(checkpoint: HFCheckpoint) -> QuantSpec | None:
    """QuantSpec.mxfp4() where the family reads the checkpoint's experts as MXFP4 (learned from
    shapes alone), else None: the experts are plain and `--expert-bits` decides."""
    config = checkpoint.config
    w1, _, _ = checkpoint.family.expert_matrices(checkpoint.shape_view(), config.moe_layers[0], 0)
    return QuantSpec.mxfp4() if isinstance(w1, Mxfp4Matrix) else None


def pack_checkpoint(
    *,
    model_dir: str | Path,
    out: str | Path,
    expert_bits: int = 16,
    dense_bits: int = 16,
    group_size: int = 64,
    progress: bool = True,
    hub: HubSettings | None = None,
) -> PackSummary:
    """Pack `model_dir` (a checkpoint folder, or a Hugging Face repo id ORG/NAME read as `hub` says,
    by default from the HF_* environment) into a new store folder `out`. Warnings (stale partial
    folders) go to stderr."""
    check_out_folder(out)  # first, so a bad --out costs no time (StoreWriter checks it again)
    checkpoint = HFCheckpoint(checkpoint_folder(model_dir, hub, progress=progress))
    config = checkpoint.config
    unused = checkpoint.unused_tensors()
    if unused:  # before any work: a tensor we would drop silently is a model we would run wrongly
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise ConfigError(f"{checkpoint.file_of(unused[0])}: tensor {unused[0]}{more} is not used by moe-edge's "
                          f"{config.family} reader; the model has a part moe-edge does not implement, so pack refuses it")
    if dense_bits not in (16, 4):
        raise ConfigError(f"--dense-bits {dense_bits}: choose 16 or 4")
    expert_spec, dense_spec = QuantSpec(expert_bits, group_size), QuantSpec(dense_bits, group_size)
    stored = stored_expert_spec(checkpoint)
    if stored is not None:
        print(f"note: {checkpoint.folder}: the experts are MXFP4 and are kept as stored (4.25 bits per weight); "
              f"--expert-bits applies only to bf16 or float32 experts", file=sys.stderr)
        expert_spec = stored
    dtype = checkpoint.dtype
    if checkpoint.fp8_blocks is not None:
        blocks = checkpoint.fp8_blocks
        print(f"note: {checkpoint.folder}: the FP8 block weights ({blocks.rows}x{blocks.columns} scales) are dequantized "
              f"to {dtype_name(dtype)} as they are read, then stored as --expert-bits and --dense-bits say",
              file=sys.stderr)
    layout = BlobLayout.for_expert(config, expert_spec, dtype)
    fields = dict(
        model=config,
        hf_config=checkpoint.hf_config,
        dtype=dtype_name(dtype),
        expert_quant=expert_spec,
        dense_quant=dense_spec,
        layout=layout,
    )
    for stale in partial_folder.stale_partials(store_path(out).parent):
        print(f"warning: {stale.line()}", file=sys.stderr)
    expected = expected_store_bytes(checkpoint, layout, dense_spec)
    with StoreWriter(out, fields, expected_bytes=expected) as writer:
        total = len(config.moe_layers) * config.num_experts
        with tqdm(total=total, desc="packing experts", unit="expert", disable=not progress) as bar:
            for layer in config.moe_layers:
                blobs = []
                for expert in range(config.num_experts):
                    w1, w3, w2 = checkpoint.family.expert_matrices(checkpoint, layer, expert)
                    biases = checkpoint.family.expert_biases(checkpoint, layer, expert) if config.expert_bias else None
                    blobs.append(layout.pack(expert_tensors(w1, w3, w2, expert_spec, biases)))
                    bar.update()
                writer.write_layer(layer, blobs)
        dense = dense_tensors(checkpoint, dense_spec)
        writer.write_dense(dense)
        for path in [checkpoint.folder / "config.json", *checkpoint.tokenizer_files()]:
            writer.copy_file(path)
        manifest = writer.finish()
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.values())
    return PackSummary(Path(out), manifest, layout.nbytes * total, dense_bytes)
