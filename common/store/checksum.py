"""Checksums of expert blobs: xxh3-64, fast enough (>10 GB/s) to verify every fetch."""

from __future__ import annotations

import torch
import xxhash

ALGORITHM = "xxh3_64"


def blob_checksum(blob: torch.Tensor | bytes | memoryview) -> str:
    """Hex digest of a CPU uint8 tensor or a bytes-like object."""
    if isinstance(blob, torch.Tensor):
        blob = blob.numpy()
    return xxhash.xxh3_64_hexdigest(blob)


class StreamingChecksum:
    """The same digest computed over chunks as they arrive."""

    def __init__(self) -> None:
        self._state = xxhash.xxh3_64()

    def update(self, chunk: bytes | memoryview) -> None:
        self._state.update(chunk)

    def hexdigest(self) -> str:
        return self._state.hexdigest()


def file_checksum(path) -> str:
    """Digest of a whole file, read in 16 MiB chunks."""
    state = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            state.update(chunk)
    return state.hexdigest()
