"""Writing a store. Everything goes into a hidden sibling folder that is renamed into place only
when the store is complete, so a failed or interrupted pack leaves nothing half-written and
never writes over an existing folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import StoreError
from ..expert_id import ExpertId
from .checksum import blob_checksum, file_checksum
from .manifest import DENSE_FILE, ExpertRecord, Manifest, expert_file_name


class StoreWriter:
    def __init__(self, out: str | Path, manifest_fields: dict) -> None:
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise StoreError(f"{self.out}: already exists and is not empty; pack never writes over a folder, choose a new --out")
        if not self.out.parent.is_dir():
            raise StoreError(f"{self.out.parent}: no such folder to create the store in")
        self._fields = manifest_fields
        self._experts: dict[ExpertId, ExpertRecord] = {}
        self._dense_checksum: str | None = None
        self._tokenizer_files: list[str] = []
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_layer(self, layer: int, blobs: list[torch.Tensor]) -> None:
        """The blobs of one layer's experts, in expert order, into that layer's file."""
        name = expert_file_name(layer)
        tensors = {ExpertId(layer, e).tensor_name: blob for e, blob in enumerate(blobs)}
        save_file(tensors, str(self.tmp / name), metadata={"format": "moe-edge-experts"})
        for e, blob in enumerate(blobs):
            self._experts[ExpertId(layer, e)] = ExpertRecord(name, blob_checksum(blob))

    def write_dense(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self.tmp / DENSE_FILE
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "moe-edge-dense"})
        self._dense_checksum = file_checksum(path)

    def copy_file(self, source: Path) -> None:
        shutil.copy2(source, self.tmp / source.name)
        self._tokenizer_files.append(source.name)

    def finish(self) -> Manifest:
        if self._dense_checksum is None:
            raise StoreError("internal: the dense weights were never written")
        manifest = Manifest(
            experts=self._experts,
            dense_checksum=self._dense_checksum,
            tokenizer_files=sorted(self._tokenizer_files),
            **self._fields,
        )
        manifest.write(self.tmp)
        if self.out.exists():
            self.out.rmdir()  # checked empty above
        self.tmp.rename(self.out)
        return manifest
