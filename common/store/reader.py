"""Opening a packed store: the manifest, the expert files, the dense weights.

Expert blobs are read with `os.preadv` at their offset straight into the caller's buffer (pinned
staging memory on CUDA), never through memory-mapped pages: a file that shrinks or changes
while the store is open then gives a StoreError naming the file, not a SIGBUS. The page cache
still serves warm reads, so this is the SSD tier.

Checksums, by the policy `read_blob_into` states: a blob is verified on its first read and again
whenever its file's identity (device, inode, size, mtime_ns, ctime_ns) differs from the one it
was last verified under, or changed during the read. Every file is checked when the store opens
(present, a readable safetensors header that places each blob inside the file)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import StoreError
from ..expert_id import ExpertId
from .checksum import blob_checksum, file_checksum
from .manifest import Manifest

MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on a header

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): what "the file may have changed" compares
FileIdentity = tuple[int, int, int, int, int]


def _identity(stat: os.stat_result) -> FileIdentity:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _open_safetensors(path: Path):
    if not path.is_file():
        raise StoreError(f"{path}: missing from the store")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise StoreError(f"{path}: unreadable ({err}); the file is truncated or corrupt, re-run pack") from None


def _read_exactly(fd: int, view: memoryview, offset: int) -> int:
    """Bytes read into `view` from `offset` on; fewer than len(view) only at the end of the file."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)  # may return less than asked (2 GiB cap)
        if count == 0:
            break
        done += count
    return done


class _OpenFile:
    """One open descriptor of an experts file and where its blobs lie in it (absolute offsets)."""

    def __init__(self, path: Path, eids: list[ExpertId], blob_nbytes: int) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise StoreError(f"{path}: missing from the store") from None
        except OSError as err:
            raise StoreError(f"{path}: cannot open ({err.strerror})") from None
        self.identity = _identity(os.fstat(self.fd))
        self.offsets = self._blob_offsets(path, eids, blob_nbytes)

    def _blob_offsets(self, path: Path, eids: list[ExpertId], blob_nbytes: int) -> dict[ExpertId, int]:
        size = self.identity[2]
        corrupt = f"{path}: not a complete experts file"
        prefix = os.pread(self.fd, 8, 0)
        if len(prefix) < 8:
            raise StoreError(f"{corrupt} ({size} bytes); the file is truncated or corrupt, re-run pack")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise StoreError(f"{corrupt}: its header claims {header_bytes} bytes of {size}; truncated or corrupt, re-run pack")
        try:
            header = json.loads(os.pread(self.fd, header_bytes, 8))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StoreError(f"{corrupt}: its header is not valid JSON; re-run pack") from None
        data_start = 8 + header_bytes
        offsets = {}
        for eid in eids:
            entry = header.get(eid.tensor_name) if isinstance(header, dict) else None
            if not isinstance(entry, dict):
                raise StoreError(f"{path}: has no blob for {eid}")
            begin, end = entry.get("data_offsets") or (0, 0)
            if (entry.get("dtype") != "U8" or entry.get("shape") != [blob_nbytes] or not isinstance(begin, int)
                    or not isinstance(end, int) or begin < 0 or end - begin != blob_nbytes):
                raise StoreError(f"{path}: blob of {eid} has {entry.get('shape')} {entry.get('dtype')}, "
                                 f"the layout needs [{blob_nbytes}] U8")
            if data_start + end > size:
                raise StoreError(f"{path}: is {size} bytes, {eid} needs bytes {data_start + begin}-{data_start + end}; "
                                 "the file is truncated, re-run pack")
            offsets[eid] = data_start + begin
        return offsets

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


class ExpertFile:
    """An experts file read by pread. Reopened (and its header read again) when the name points
    at another file than the one open: a store file replaced by a copy or a rename."""

    def __init__(self, path: Path, eids: list[ExpertId], blob_nbytes: int) -> None:
        self.path = path
        self._eids = eids
        self._blob_nbytes = blob_nbytes
        self._lock = threading.Lock()
        self._current = _OpenFile(path, eids, blob_nbytes)
        self._replaced: list[_OpenFile] = []  # kept open: another thread may still be reading one

    def _file_for(self, stat: os.stat_result) -> _OpenFile:
        current = self._current
        if (stat.st_dev, stat.st_ino) == current.identity[:2]:
            return current
        with self._lock:
            if (stat.st_dev, stat.st_ino) != self._current.identity[:2]:
                self._replaced.append(self._current)
                self._current = _OpenFile(self.path, self._eids, self._blob_nbytes)
            return self._current

    def read_into(self, eid: ExpertId, view: memoryview) -> FileIdentity | None:
        """Fill `view` with the blob's bytes. Returns the file's identity, or None when the file
        changed while it was read (the caller then must not trust an earlier verification)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: missing from the store (deleted while in use?)") from None
        opened = self._file_for(stat)
        offset = opened.offsets[eid]
        try:
            count = _read_exactly(opened.fd, view, offset)
            after = _identity(os.fstat(opened.fd))
        except OSError as err:
            raise StoreError(f"{self.path}: cannot read {eid} ({err.strerror})") from None
        if count < len(view):
            raise StoreError(f"{self.path}: is {after[2]} bytes, {eid} needs bytes {offset}-{offset + len(view)}; "
                             "the file shrank while in use (restore it or re-run pack)")
        return after if after == _identity(stat) else None


class ExpertStore:
    """Read access to one store folder. Knows nothing of caches, GPUs or networks."""

    def __init__(self, folder: str | Path, *, with_experts: bool = True) -> None:
        """`with_experts=False` reads only the manifest and dense weights: a coordinator whose
        experts live on expert hosts needs no expert files of its own."""
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        self.layout = self.manifest.layout
        self._files: dict[str, ExpertFile] = {}
        self._verified: dict[ExpertId, FileIdentity] = {}  # the file's identity when the blob last passed
        dense = self.folder / self.manifest.dense_file
        if not dense.is_file():
            raise StoreError(f"{dense}: missing from the store")
        if not with_experts:
            return
        by_file: dict[str, list[ExpertId]] = {}
        for eid, rec in sorted(self.manifest.experts.items()):
            by_file.setdefault(rec.file, []).append(eid)
        for name, eids in by_file.items():
            self._files[name] = ExpertFile(self.folder / name, eids, self.layout.nbytes)

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

    def read_blob_into(self, eid: ExpertId, out: torch.Tensor, *, always_verify: bool = False) -> None:
        """Fill `out` (CPU uint8 [blob bytes], contiguous; pinned or not) with the expert's blob.

        Verified against its checksum on the first read, whenever its file's identity differs
        from the one it last passed under (the file may have changed), and always with
        `always_verify`. A blob that fails is verified again on its next read, so a restored
        file works again."""
        rec = self._record(eid)
        if rec.file not in self._files:
            raise StoreError(f"{eid}: this store was opened without its expert files")
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != self.layout.nbytes:
            raise ValueError(f"read_blob_into wants a contiguous CPU uint8 tensor of {self.layout.nbytes} bytes")
        identity = self._files[rec.file].read_into(eid, memoryview(out.numpy()).cast("B"))
        if always_verify or identity is None or self._verified.get(eid) != identity:
            self._verified.pop(eid, None)
            self.verify(eid, out)
            if identity is not None:
                self._verified[eid] = identity

    def expert_blob(self, eid: ExpertId) -> torch.Tensor:
        """[blob bytes] uint8: a new CPU tensor holding the blob, read and checked as read_blob_into does."""
        blob = torch.empty(self.layout.nbytes, dtype=torch.uint8)
        self.read_blob_into(eid, blob)
        return blob

    def verify(self, eid: ExpertId, blob: torch.Tensor) -> None:
        """Raise StoreError unless `blob` (CPU) has the checksum the manifest records for `eid`."""
        rec = self._record(eid)
        if blob_checksum(blob) != rec.checksum:
            raise StoreError(
                f"{self.folder / rec.file}: {eid} fails its checksum (file corrupt or changed since pack; re-run pack)"
            )

    def checksum_of(self, eid: ExpertId) -> str:
        return self._record(eid).checksum

    def load_dense(self) -> dict[str, torch.Tensor]:
        """All dense tensors (CPU, stored dtype), after checking the file's checksum."""
        path = self.folder / self.manifest.dense_file
        handle = _open_safetensors(path)
        if file_checksum(path) != self.manifest.dense_checksum:
            raise StoreError(f"{path}: fails its checksum (file corrupt or changed since pack; re-run pack)")
        return {name: handle.get_tensor(name) for name in handle.keys()}

    def tokenizer_folder(self) -> Path:
        return self.folder
