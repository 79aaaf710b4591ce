"""Reading a Hugging Face checkpoint folder (config.json, safetensors shards, tokenizer files).
Which tensors mean what is the model family's business (coordinator/families/).

Only safetensors are read: a pickle (.bin) checkpoint is refused, never unpickled. Every
floating-point tensor is checked for NaN and Inf as it is read, so a corrupt or diverged
checkpoint is refused by tensor name instead of packing into a store that generates garbage."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from common.errors import MoeEdgeError, StoreError
from common.model_config import ModelConfig

from ..families import family_for

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
    "BOOL": torch.bool,
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
        self.config: ModelConfig = self.family.model_config(self.hf_config, source=str(config_path))
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

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise StoreError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        try:
            tensor = self._handles[self._where[name]].get_tensor(name)
        except MoeEdgeError:
            raise  # e.g. WritingStopped, raised by a SIGTERM handler while we were in here
        except Exception as err:
            raise StoreError(f"{self.folder / self._where[name]}: cannot read {name} ({err})") from None
        if name not in self._checked_finite:
            self._refuse_non_finite(name, tensor)
            self._checked_finite.add(name)
        return tensor

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
        return torch.empty(view.get_shape(), dtype=dtype, device="meta")

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor("model.embed_tokens.weight").dtype

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
        return self._checkpoint.meta_tensor(name)
