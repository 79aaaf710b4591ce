"""Writing a store. Everything goes into a hidden sibling folder (common/store/partial_folder.py)
that is renamed into place only when the store is complete, so a failed or interrupted pack leaves
nothing half-written and never writes over an existing folder.

The writer refuses an unusable destination (a symbolic link, a file, a non-empty folder, a missing
or read-only parent, too little free space) before anything is written; turns a failed write
(disk full, file too large, quota) into one StoreError naming the file; and removes its partial
folder on every exit it can see: an exception, Ctrl-C, and SIGTERM, which for the duration of the
`with` block raises WritingStopped instead of killing the process. It knows nothing about
checkpoints or quantization: it is handed finished tensors."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import MoeEdgeError, StoreError
from ..expert_id import ExpertId
from . import partial_folder
from .checksum import blob_checksum, file_checksum
from .manifest import DENSE_FILE, ExpertRecord, Manifest, expert_file_name
from .partial_folder import size_text

SPACE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than allowed (a file size limit, ulimit -f, or the filesystem's largest file)",
}


class WritingStopped(MoeEdgeError):
    """A signal (SIGTERM) stopped the writing of a store; its exit code is 128 + the signal, as a
    shell reports a process killed by that signal."""

    def __init__(self, out: Path, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{out}: stopped by {name} before the store was complete; its partial folder is removed")
        self.exit_code = 128 + signum


def check_out_folder(out: str | Path) -> None:
    """Refuse, before any work, a destination the store could not be renamed onto safely."""
    out = store_path(out)
    if out.is_symlink():
        raise StoreError(f"{out}: is a symbolic link (to {os.readlink(out)}); pack never writes through or over a link: "
                         "choose a --out that is a new folder")
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: is a file, not a folder; choose a new --out")
    if out.is_dir() and any(out.iterdir()):
        raise StoreError(f"{out}: already exists and is not empty; pack never writes over a folder, choose a new --out")
    parent = out.parent
    if not parent.exists():
        raise StoreError(f"{parent}: no such folder to create the store in")
    if not parent.is_dir():
        raise StoreError(f"{parent}: is not a folder, so the store cannot be created in it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{parent}: not writable (permissions or a read-only filesystem); choose another --out")


def store_path(out: str | Path) -> Path:
    """`out` made absolute without following links, so "." or "a/.." has a real name and parent."""
    return Path(os.path.abspath(out))


def check_free_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise StoreError(f"{out.parent}: the store needs {size_text(needed)} ({needed} bytes) but only "
                         f"{size_text(free)} ({free} bytes) is free; free some space or choose another --out")


class StoreWriter:
    def __init__(self, out: str | Path, manifest_fields: dict, *, expected_bytes: int | None = None) -> None:
        """`expected_bytes`: the store's size on disk, checked against the free space up front."""
        self.out = store_path(out)
        check_out_folder(self.out)
        if expected_bytes is not None:
            check_free_space(self.out, expected_bytes)
        self._fields = manifest_fields
        self._experts: dict[ExpertId, ExpertRecord] = {}
        self._dense_checksum: str | None = None
        self._tokenizer_files: list[str] = []
        self.tmp = partial_folder.path_for(self.out)
        self._previous_handlers: dict[int, object] = {}
        self._stopped: WritingStopped | None = None  # set by the SIGTERM handler, whatever the code it interrupted raised

    def __enter__(self) -> "StoreWriter":
        self._catch_sigterm()
        try:
            with self._writing(self.tmp.name):
                self.tmp = partial_folder.create(self.out)
        except BaseException:
            self._restore_handlers()
            partial_folder.remove(self.tmp)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # A second Ctrl-C or SIGTERM must not cut the clean-up short and leave the folder behind.
            with _signals_ignored():
                partial_folder.remove(self.tmp)
        self._restore_handlers()
        if self._stopped is not None and not isinstance(exc, WritingStopped):
            # The handler raised inside C code (a safetensors read, say), which reported its own
            # error instead: the stop is what happened, and what the exit code must say.
            raise self._stopped from None

    def write_layer(self, layer: int, blobs: list[torch.Tensor]) -> None:
        """The blobs of one layer's experts, in expert order, into that layer's file."""
        name = expert_file_name(layer)
        tensors = {ExpertId(layer, e).tensor_name: blob for e, blob in enumerate(blobs)}
        with self._writing(name):
            save_file(tensors, str(self.tmp / name), metadata={"format": "moe-edge-experts"})
        for e, blob in enumerate(blobs):
            self._experts[ExpertId(layer, e)] = ExpertRecord(name, blob_checksum(blob))

    def write_dense(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self.tmp / DENSE_FILE
        with self._writing(DENSE_FILE):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "moe-edge-dense"})
        self._dense_checksum = file_checksum(path)

    def copy_file(self, source: Path) -> None:
        with self._writing(source.name):
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
        with self._writing("manifest.json"):
            manifest.write(self.tmp)
            partial_folder.seal(self.tmp)
        check_out_folder(self.out)  # again: something may have appeared there while we packed
        try:
            if self.out.exists():
                self.out.rmdir()  # checked empty just above
            self.tmp.rename(self.out)
        except OSError as err:
            raise StoreError(f"{self.out}: cannot move the finished store into place ({err.strerror}); "
                             "nothing was written there") from None
        return manifest

    @contextmanager
    def _writing(self, name: str):
        """Turn a failed write of file `name` into one StoreError that names it."""
        try:
            yield
        except OSError as err:
            raise self._write_error(name, err.errno, err.strerror) from None
        except SafetensorError as err:  # safetensors writes in Rust: its I/O error only says "os error N"
            found = re.search(r"os error (\d+)", str(err))
            raise self._write_error(name, int(found[1]) if found else None, str(err)) from None

    def _write_error(self, name: str, code: int | None, detail: str | None) -> StoreError:
        where = f"{self.out}: writing {name} failed"
        if code in SPACE_ERRORS:
            return StoreError(f"{where}: {SPACE_ERRORS[code]} ({errno.errorcode[code]}{self._space_left(code)}); "
                              "the partial store is removed")
        return StoreError(f"{where}: {detail}; the partial store is removed")

    def _space_left(self, code: int) -> str:
        if code == errno.EFBIG:
            return ""  # a per-file limit: the free space says nothing about it
        usage = os.statvfs(self.out.parent)
        if code == errno.ENOSPC and usage.f_favail == 0 and usage.f_files > 0:
            return f": no free inodes (file entries) left in {self.out.parent}"
        return f", {size_text(usage.f_bavail * usage.f_frsize)} free in {self.out.parent}"

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; a pack in a worker thread keeps the default

        def stop(signum, frame):
            signal.signal(signum, signal.SIG_IGN)  # one stop is enough; the clean-up runs next
            self._stopped = WritingStopped(self.out, signum)
            raise self._stopped

        self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, stop)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


@contextmanager
def _signals_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
