"""Reading a Hugging Face checkpoint folder (config.json, safetensors shards, tokenizer files).
Which tensors mean what is the model family's business (coordinator/families/).

Only safetensors are read: a pickle (.bin) checkpoint is refused, never unpickled. Every
floating-point tensor is checked for NaN and Inf as it is read, so a corrupt or diverged
checkpoint is refused by tensor name instead of packing into a store that generates garbage.
In an FP8 block checkpoint (DeepSeek-V3's, fp8_blocks.py) a weight with a `_scale_inv` beside it
is dequantized to the checkpoint's dtype (its embedding's) as it is read, and the shape view
gives it that dtype: a family reads it as it would a bf16 weight."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import ConfigError, MoeEdgeError, StoreError
from common.model_config import ModelConfig

from ..families import family_for, hf_layout
from . import fp8_blocks

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

FINITE_CHECK_CHUNK = 1 << 24  # elements per isfinite() pass: bounds its temporary bool tensor to 16 MB

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class HFCheckpoint:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StoreError(f"{self.folder}: no such model folder")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise StoreError(f"{config_path}: missing; a Hugging Face model folder has a config.json")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{config_path}: not valid JSON ({err})") from None
        self.family = family_for(self.hf_config, source=str(config_path))
        self._refuse_other_quantization(str(config_path))
        self.config: ModelConfig = self.family.model_config(self.hf_config, source=str(config_path))
        self.fp8_blocks = fp8_blocks.block_format(self.hf_config, source=str(config_path))  # None: no fp8 weights
        self._handles = {}
        self._where: dict[str, str] = {}
        self._checked_finite: set[str] = set()  # a fused experts tensor is read once per expert
        shards = self._shards()
        if not shards:
            pickles = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are not read; convert them to safetensors)" if pickles else ""
            raise StoreError(f"{self.folder}: no *.safetensors weights{hint}")
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt")
            except Exception as err:
                raise StoreError(f"{shard}: unreadable safetensors file ({err})") from None
            self._handles[shard.name] = handle
            for name in handle.keys():
                self._where[name] = shard.name

    def _refuse_other_quantization(self, source: str) -> None:
        """A quantization_config is read only where it names the family's QUANT_METHODS (GPT-OSS:
        its MXFP4, kept as stored) or, for a family that names none, FP8 blocks (dequantized as
        read); any other method is refused by name, before its tensors would be."""
        method = (self.hf_config.get("quantization_config") or {}).get("quant_method")
        allowed = getattr(self.family, "QUANT_METHODS", ("fp8",))
        if method is not None:
            hf_layout.require(source, "quantization_config.quant_method", method, allowed,
                              "; fp8 block weights are dequantized as pack reads them" if "fp8" in allowed else "")

    def _shards(self) -> list[Path]:
        """The shards the index file names (each must exist), else every *.safetensors file."""
        index = self.folder / "model.safetensors.index.json"
        if not index.is_file():
            return sorted(self.folder.glob("*.safetensors"))
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise StoreError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
        missing = [name for name in names if not (self.folder / name).is_file()]
        if missing:
            raise StoreError(f"{self.folder / missing[0]}: missing, but {index.name} lists it")
        return [self.folder / name for name in names]

    def has(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        """Every tensor name the checkpoint holds, sorted."""
        return sorted(self._where)

    def file_of(self, name: str) -> Path:
        return self.folder / self._where[name]

    def unused_tensors(self) -> list[str]:
        """The tensors the family would not read (nor knowingly leaves out), found from shapes
        alone: a checkpoint that has them is one moe-edge would run wrongly."""
        view = self.shape_view()
        self.family.dense_tensors(view)
        for layer in self.config.moe_layers:
            for expert in range(self.config.num_experts):
                self.family.expert_matrices(view, layer, expert)
                if self.config.expert_bias:
                    self.family.expert_biases(view, layer, expert)
        return [name for name in self.names() if name not in view.read and not self.family.left_out(name, self.config)]

    def scale_of(self, name: str) -> str | None:
        """The `_scale_inv` tensor beside the weight `name` in an FP8 block checkpoint, else None."""
        scale = name + fp8_blocks.SCALE_SUFFIX
        return scale if self.fp8_blocks is not None and name.endswith(".weight") and scale in self._where else None

    def _fp8_pair(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> str:
        """The scale name of an FP8 weight, checked against it from shapes alone; refused by name
        where there is none or the checkpoint does not say it is an fp8 block checkpoint."""
        where = self.folder / self._where[name]
        if self.fp8_blocks is None:
            raise ConfigError(f"{where}: tensor {name} is {dtype}, but config.json has no quantization_config "
                              "with quant_method 'fp8' saying how to scale it")
        scale = self.scale_of(name)
        if scale is None:
            raise ConfigError(f"{where}: tensor {name} is {dtype} without its {name}{fp8_blocks.SCALE_SUFFIX}; "
                              "an fp8 block weight needs its scales")
        view = self._handles[self._where[scale]].get_slice(scale)
        fp8_blocks.check_pair(dtype, shape, SAFETENSORS_DTYPES.get(view.get_dtype()), tuple(view.get_shape()),
                              self.fp8_blocks, where=str(where), name=name)
        return scale

    def tensor(self, name: str) -> torch.Tensor:
        tensor = self._read(name)
        if tensor.dtype in fp8_blocks.FP8_DTYPES:
            scale = self._fp8_pair(name, tensor.dtype, tuple(tensor.shape))
            tensor = fp8_blocks.dequantize(tensor, self._read(scale), self.fp8_blocks, self.dtype)
        if name not in self._checked_finite:
            self._refuse_non_finite(name, tensor)
            self._checked_finite.add(name)
        return tensor

    def _read(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise StoreError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except MoeEdgeError:
            raise  # e.g. WritingStopped, raised by a SIGTERM handler while we were in here
        except Exception as err:
            raise StoreError(f"{self.folder / self._where[name]}: cannot read {name} ({err})") from None

    def _refuse_non_finite(self, name: str, tensor: torch.Tensor) -> None:
        if not tensor.is_floating_point():
            return
        flat = tensor.reshape(-1)
        if all(torch.isfinite(chunk).all() for chunk in flat.split(FINITE_CHECK_CHUNK)):
            return
        nans = int(torch.isnan(flat).sum())
        infs = int(torch.isinf(flat).sum())
        raise StoreError(f"{self.folder / self._where[name]}: tensor {name} has {nans} NaN and {infs} Inf values "
                         f"(of {flat.numel()}); a corrupt download or a diverged checkpoint: pack refuses it")

    def shape_view(self) -> "CheckpointShapes":
        """This checkpoint with every tensor as an empty 'meta' tensor: sizes without reading weights."""
        return CheckpointShapes(self)

    def meta_tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            return self.tensor(name)  # raises, naming it
        view = self._handles[self._where[name]].get_slice(name)
        dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
        if dtype is None:
            return self.tensor(name).to("meta")  # a rare dtype: read it once to learn its size
        if dtype in fp8_blocks.FP8_DTYPES:  # checked now, and read as the dequantized weight it becomes
            self._fp8_pair(name, dtype, tuple(view.get_shape()))
            dtype = self.dtype
        elif self.scale_of(name) is not None:  # scales that would go unapplied
            raise ConfigError(f"{self.file_of(name)}: tensor {name}{fp8_blocks.SCALE_SUFFIX} scales {name}, which is "
                              f"{dtype}, not fp8; pack does not know what it would mean")
        return torch.empty(view.get_shape(), dtype=dtype, device="meta")

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: its embedding's (learned from the header, nothing read)."""
        name = "model.embed_tokens.weight"
        if name in self._where:
            dtype = SAFETENSORS_DTYPES.get(self._handles[self._where[name]].get_slice(name).get_dtype())
            if dtype in fp8_blocks.FP8_DTYPES:
                raise ConfigError(f"{self.file_of(name)}: tensor {name} is {dtype}; the embedding gives the "
                                  "checkpoint's dtype and must be bf16, float16 or float32")
            if dtype is not None:
                return dtype
        return self.tensor(name).dtype  # missing (raises, naming it) or a rare dtype

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]



class CheckpointShapes:
    """What a model family reads from a checkpoint (`config`, `folder`, `has`, `tensor`), with
    `tensor` giving shape and dtype only: the store's size can be known before packing."""

    def __init__(self, checkpoint: HFCheckpoint) -> None:
        self._checkpoint = checkpoint
        self.folder = checkpoint.folder
        self.config = checkpoint.config
        self.hf_config = checkpoint.hf_config
        self.read: set[str] = set()  # the names asked for, so pack can tell which tensors go unused

    def has(self, name: str) -> bool:
        return self._checkpoint.has(name)

    def tensor(self, name: str) -> torch.Tensor:
        self.read.add(name)
        scale = self._checkpoint.scale_of(name)
        if scale is not None:  # an fp8 weight's scales are read with it
            self.read.add(scale)
        return self._checkpoint.meta_tensor(name)
