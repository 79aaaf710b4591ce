"""manifest.json: what a store holds and how to read it. The one place the format is defined.

A reader refuses an unknown format version, a field of the wrong type, range or consistency
(manifest_schema.py), a model_id that does not match the content, a missing file or a bad
checksum, with an error that names the file and the field; nothing is silently zero-filled."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..expert_id import ExpertId
from ..model_config import ModelConfig
from ..quantization import QuantSpec
from .blob_layout import BlobLayout
from .checksum import ALGORITHM
from .manifest_schema import check_consistency, parse_document

FORMAT_NAME = "moe-edge-store"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DENSE_FILE = "dense.safetensors"


def expert_file_name(layer: int) -> str:
    """One file per layer: the experts of a layer are written (and read) together."""
    return f"experts-{layer:05d}.safetensors"


@dataclass(frozen=True)
class ExpertRecord:
    file: str
    checksum: str


@dataclass
class Manifest:
    model: ModelConfig
    hf_config: dict[str, Any]
    dtype: str  # dense weights and unquantized experts
    expert_quant: QuantSpec
    dense_quant: QuantSpec
    layout: BlobLayout
    experts: dict[ExpertId, ExpertRecord]
    dense_checksum: str
    tokenizer_files: list[str] = field(default_factory=list)
    dense_file: str = DENSE_FILE

    @property
    def model_id(self) -> str:
        """Identity of the store's content: two stores with the same id hold the same experts."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.model.identity_dict(), sort_keys=True).encode())
        digest.update(json.dumps(self.layout.to_dict(), sort_keys=True).encode())
        for eid in sorted(self.experts):
            digest.update(f"{eid.layer}.{eid.expert}:{self.experts[eid].checksum};".encode())
        digest.update(self.dense_checksum.encode())
        return digest.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "model": self.model.to_dict(),
            "dtype": self.dtype,
            "quantization": {"experts": self.expert_quant.to_dict(), "dense": self.dense_quant.to_dict()},
            "blob_layout": self.layout.to_dict(),
            "checksum_algorithm": ALGORITHM,
            "dense": {"file": self.dense_file, "checksum": self.dense_checksum},
            "experts": [
                {"layer": eid.layer, "expert": eid.expert, "file": rec.file, "checksum": rec.checksum}
                for eid, rec in sorted(self.experts.items())
            ],
            "tokenizer_files": self.tokenizer_files,
            "hf_config": self.hf_config,
        }

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        """Parse and check manifest.json (manifest_schema.py); its files are the reader's to check."""
        path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise StoreError(f"{folder}: no such store folder")
        if not path.is_file():
            raise StoreError(f"{path}: missing; is {folder} a store made by `python -m coordinator pack`?")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise StoreError(f"{path}: not a moe-edge store manifest")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{path}: format version {version} is not supported (this moe-edge reads version {FORMAT_VERSION}); re-run pack"
            )
        doc = parse_document(data, source=path)
        model, expert_quant, dense_quant, layout = check_consistency(doc, source=path)
        manifest = cls(
            model=model,
            hf_config=doc.hf_config,
            dtype=doc.dtype,
            expert_quant=expert_quant,
            dense_quant=dense_quant,
            layout=layout,
            experts={ExpertId(e.layer, e.expert): ExpertRecord(e.file, e.checksum) for e in doc.experts},
            dense_checksum=doc.dense.checksum,
            tokenizer_files=list(doc.tokenizer_files),
            dense_file=doc.dense.file,
        )
        # Checked last, so a hand edit is named by the field it broke rather than by the id.
        if doc.model_id != manifest.model_id:
            raise StoreError(f"{path}: model_id {doc.model_id} does not match its content ({manifest.model_id}); "
                             "edited by hand? re-run pack")
        return manifest
