"""The hidden folder a store is built in before it is renamed into place: `.STORE.partial-PID`
beside the store, holding an owner file that names the process and host building it.

Knows how to name, create and remove one, and how to find ones whose builder is gone (a pack
killed with SIGKILL, or a machine that lost power): those are only named, never deleted here,
because a process id alone cannot prove that a folder is abandoned. Knows nothing about what a
store holds."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

OWNER_FILE = "pack-owner.json"  # removed before the rename, so a finished store never has it

_NAME = re.compile(r"^\.(?P<store>.+)\.partial-(?P<pid>\d+)$")


def path_for(out: Path, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid() if pid is None else pid}"


def create(out: Path) -> Path:
    """Make this process's partial folder for `out` and write its owner file. A folder of the
    same name can only be left by a dead process that had our pid, so it is cleared first."""
    path = path_for(out)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "store": out.name}
    (path / OWNER_FILE).write_text(json.dumps(owner) + "\n")
    return path


def seal(path: Path) -> None:
    """Drop the owner file: the folder is about to become a finished store."""
    (path / OWNER_FILE).unlink(missing_ok=True)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class StalePartial:
    path: Path
    pid: int
    nbytes: int

    def line(self) -> str:
        return (f"{self.path} ({size_text(self.nbytes)}) is left from a pack that was killed (pid {self.pid} "
                f"is no longer running); nothing uses it: delete it with rm -r {shlex.quote(str(self.path))}")


def stale_partials(parent: Path) -> list[StalePartial]:
    """Partial folders in `parent` whose building process is gone. A folder whose owner file
    names another host is skipped: its process may be alive there."""
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _NAME.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _builder_may_be_alive(entry, pid):
            continue
        found.append(StalePartial(entry, pid, folder_bytes(entry)))
    return found


def _builder_may_be_alive(folder: Path, pid: int) -> bool:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        if owner.get("host") != socket.gethostname():
            return True
    except (OSError, ValueError, AttributeError):
        pass  # killed before the owner file was written, or made by an older pack: judge by the pid
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def size_text(nbytes: int) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as disks are sold)."""
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError
