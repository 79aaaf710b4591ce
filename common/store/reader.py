"""Opening a packed store: the manifest, memory-mapped expert blobs, the dense weights.

safetensors memory-maps its files, so `expert_blob()` costs nothing until its bytes are read:
that is the SSD tier. Every file is checked when the store opens (present, readable header,
the expected tensors and sizes); blob contents are checked against their checksums by `verify`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import StoreError
from ..expert_id import ExpertId
from .checksum import blob_checksum, file_checksum
from .manifest import DENSE_FILE, Manifest


def _open_safetensors(path: Path):
    if not path.is_file():
        raise StoreError(f"{path}: missing from the store")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise StoreError(f"{path}: unreadable ({err}); the file is truncated or corrupt, re-run pack") from None


class ExpertStore:
    """Read access to one store folder. Knows nothing of caches, GPUs or networks."""

    def __init__(self, folder: str | Path, *, with_experts: bool = True) -> None:
        """`with_experts=False` reads only the manifest and dense weights: a coordinator whose
        experts live on expert hosts needs no expert files of its own."""
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        self.layout = self.manifest.layout
        self._files = {}
        if not with_experts:
            return
        for name in sorted({rec.file for rec in self.manifest.experts.values()}):
            self._files[name] = _open_safetensors(self.folder / name)
        for eid, rec in self.manifest.experts.items():
            handle = self._files[rec.file]
            if eid.tensor_name not in handle.keys():
                raise StoreError(f"{self.folder / rec.file}: has no blob for {eid}")
            shape = handle.get_slice(eid.tensor_name).get_shape()
            if shape != [self.layout.nbytes]:
                raise StoreError(f"{self.folder / rec.file}: blob of {eid} has {shape} bytes, the layout needs {self.layout.nbytes}")

    @property
    def config(self):
        return self.manifest.model

    @property
    def blob_nbytes(self) -> int:
        return self.layout.nbytes

    def file_of(self, eid: ExpertId) -> Path:
        return self.folder / self._record(eid).file

    def _record(self, eid: ExpertId):
        try:
            return self.manifest.experts[eid]
        except KeyError:
            raise StoreError(f"{eid}: not in the store {self.folder}") from None

    def expert_blob(self, eid: ExpertId) -> torch.Tensor:
        """[blob bytes] uint8, memory-mapped from the file (not read until used)."""
        rec = self._record(eid)
        if rec.file not in self._files:
            raise StoreError(f"{eid}: this store was opened without its expert files")
        try:
            return self._files[rec.file].get_tensor(eid.tensor_name)
        except Exception as err:
            raise StoreError(f"{self.folder / rec.file}: cannot read {eid} ({err})") from None

    def verify(self, eid: ExpertId, blob: torch.Tensor) -> None:
        """Raise StoreError unless `blob` (CPU) has the checksum the manifest records for `eid`."""
        rec = self._record(eid)
        try:
            actual = blob_checksum(blob)
        except (OSError, RuntimeError) as err:  # a file shortened under us gives SIGBUS-free errors here
            raise StoreError(f"{self.folder / rec.file}: cannot read {eid} ({err})") from None
        if actual != rec.checksum:
            raise StoreError(
                f"{self.folder / rec.file}: {eid} fails its checksum (file corrupt or changed since pack; re-run pack)"
            )

    def checksum_of(self, eid: ExpertId) -> str:
        return self._record(eid).checksum

    def load_dense(self) -> dict[str, torch.Tensor]:
        """All dense tensors (CPU, stored dtype), after checking the file's checksum."""
        path = self.folder / DENSE_FILE
        handle = _open_safetensors(path)
        if file_checksum(path) != self.manifest.dense_checksum:
            raise StoreError(f"{path}: fails its checksum (file corrupt or changed since pack; re-run pack)")
        return {name: handle.get_tensor(name) for name in handle.keys()}

    def tokenizer_folder(self) -> Path:
        return self.folder
