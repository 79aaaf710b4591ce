"""`pack` never crashes and is never silent (issue 12): bad weights, a full disk, an unusable
--out and a killed pack each end in one line and an exit code, with no partial folder left
behind and nothing of the user's touched. Real files, real filesystems, real signals."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from common.errors import StoreError
from common.store.partial_folder import OWNER_FILE
from conftest import ROOT, coordinator_cli

EXPERT_WEIGHT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
ATTENTION_WEIGHT = "model.layers.2.self_attn.k_proj.weight"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def partial_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def pack_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["pack", "--model", str(model), "--out", str(out), "--quiet", *extra]


def copy_with(model: Path, to: Path, name: str, value: float) -> Path:
    """A copy of the checkpoint with one element of tensor `name` set to `value`."""
    shutil.copytree(model, to)
    weights = load_file(to / "model.safetensors")
    weights[name] = weights[name].clone()
    weights[name].view(-1)[7] = value
    save_file(weights, to / "model.safetensors", metadata={"format": "pt"})
    return to


@contextmanager
def mounted_tmpfs(where: Path, options: str):
    """A real small filesystem (we may be root in a container that allows mounts; else skip)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


# -- weights that would pack into a store generating garbage --------------------------------


@pytest.mark.parametrize("name, value", [(EXPERT_WEIGHT, float("nan")), (ATTENTION_WEIGHT, float("inf"))],
                         ids=["nan-in-an-expert", "inf-in-attention"])
def test_non_finite_weights_are_refused_naming_the_tensor_and_leave_no_folder(tiny_model_dir, tmp_path, name, value):
    model = copy_with(tiny_model_dir, tmp_path / "model", name, value)
    out = tmp_path / "store"
    result = coordinator_cli(*pack_args(model, out))
    assert result.returncode == 3
    line = one_error_line(result)
    assert name in line and "model.safetensors" in line
    assert ("1 NaN" if value != value else "1 Inf") in line
    assert not out.exists() and partial_folders(tmp_path) == []


# -- a full disk --------------------------------------------------------------------------------


def test_a_store_bigger_than_the_free_space_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=2m") as small:
        result = coordinator_cli(*pack_args(tiny_model_dir, small / "store"))
        assert result.returncode == 3
        line = one_error_line(result)
        assert str(small) in line and "needs" in line and "bytes" in line and "free" in line
        assert list(small.iterdir()) == []


def test_a_filesystem_that_fills_up_midway_is_one_line_and_leaves_nothing(run_coordinator, tiny_model_dir, tmp_path):
    # Plenty of bytes, so the up-front check passes, but room for only a few files: ENOSPC midway.
    with mounted_tmpfs(tmp_path / "few-inodes", "size=64m,nr_inodes=6") as small:
        result = run_coordinator(*pack_args(tiny_model_dir, small / "store", "--expert-bits", "16"))
        assert result.returncode == 3
        line = one_error_line(result)
        assert "ENOSPC" in line and "experts-0000" in line and "removed" in line
        assert list(small.iterdir()) == []


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_a_write_past_the_file_size_limit_is_one_line_and_leaves_nothing(run_coordinator, tiny_model_dir, tmp_path):
    out = tmp_path / "store"
    result = run_coordinator(*pack_args(tiny_model_dir, out, "--expert-bits", "16"), preexec_fn=_limit_file_size,
                             env_extra={"PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 3
    line = one_error_line(result)
    assert "EFBIG" in line and str(out) in line
    assert not out.exists() and partial_folders(tmp_path) == []


def test_the_free_space_check_counts_the_whole_store(tiny_model_dir, tmp_path, monkeypatch):
    import common.store.writer as writer
    from coordinator.tools.pack import pack_checkpoint

    real = shutil.disk_usage
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    with pytest.raises(StoreError, match=r"needs 1\d\.\d MB .* only 1.0 MB \(1000000 bytes\) is free"):
        pack_checkpoint(model_dir=tiny_model_dir, out=tmp_path / "store", expert_bits=16, progress=False)
    assert list(tmp_path.iterdir()) == []


# -- an --out that cannot be used ----------------------------------------------------------------


@pytest.mark.parametrize("target", ["empty-folder", "nowhere"])
def test_out_that_is_a_symlink_is_refused_at_once_and_left_untouched(run_coordinator, tiny_model_dir, tmp_path, target):
    from coordinator.tools.pack import pack_checkpoint

    if target == "empty-folder":
        (tmp_path / target).mkdir()
    link = tmp_path / "store"
    link.symlink_to(tmp_path / target)
    started = time.monotonic()
    with pytest.raises(StoreError, match="symbolic link"):
        pack_checkpoint(model_dir=tiny_model_dir, out=link, progress=False)
    assert time.monotonic() - started < 0.5  # packing this model takes seconds: nothing was packed
    result = run_coordinator(*pack_args(tiny_model_dir, link))
    assert result.returncode == 3 and str(link) in one_error_line(result)
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"store", target} - {"nowhere"})
    if target == "empty-folder":
        assert list((tmp_path / target).iterdir()) == []


def test_out_that_is_a_file_is_refused_and_kept(tiny_model_dir, tmp_path):
    from coordinator.tools.pack import pack_checkpoint

    out = tmp_path / "store"
    out.write_text("mine")
    with pytest.raises(StoreError, match="is a file"):
        pack_checkpoint(model_dir=tiny_model_dir, out=out, progress=False)
    assert out.read_text() == "mine" and partial_folders(tmp_path) == []


def test_out_in_a_missing_folder_or_under_a_file_is_refused(tiny_model_dir, tmp_path):
    from coordinator.tools.pack import pack_checkpoint

    with pytest.raises(StoreError, match=r"no-such-folder: no such folder"):
        pack_checkpoint(model_dir=tiny_model_dir, out=tmp_path / "no-such-folder" / "store", progress=False)
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(StoreError, match=r"a-file: is not a folder"):
        pack_checkpoint(model_dir=tiny_model_dir, out=tmp_path / "a-file" / "store", progress=False)


def test_out_given_as_dot_packs_into_the_empty_current_folder(tiny_model_dir, tmp_path, monkeypatch):
    from common.store.manifest import Manifest
    from coordinator.tools.pack import pack_checkpoint

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    pack_checkpoint(model_dir=tiny_model_dir, out=".", expert_bits=16, progress=False)
    assert Manifest.read(tmp_path / "here").model.num_layers == 4
    assert partial_folders(tmp_path) == []


def test_out_in_a_read_only_folder_is_refused(tiny_model_dir, tmp_path):
    from coordinator.tools.pack import pack_checkpoint

    with mounted_tmpfs(tmp_path / "read-only", "ro,size=1m") as read_only:
        with pytest.raises(StoreError, match="not writable"):
            pack_checkpoint(model_dir=tiny_model_dir, out=read_only / "store", progress=False)


# -- a pack stopped midway ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """Eight layers: packing at 4 bits takes long enough (seconds) to be stopped midway."""
    from coordinator.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("slow") / "model", num_layers=8)


@contextmanager
def pack_process(model: Path, out: Path):
    process = subprocess.Popen([sys.executable, "-m", "coordinator", *pack_args(model, out, "--expert-bits", "4")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)


def wait_until_midway(process: subprocess.Popen, partial: Path, timeout: float = 180) -> None:
    """Until the partial folder holds the first layer's file: the pack has begun writing."""
    deadline = time.monotonic() + timeout
    while not (partial / "experts-00000.safetensors").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the pack never started writing"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, exit_code, says", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                     (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_a_pack_stopped_midway_exits_with_one_line_and_removes_its_partial_folder(slow_model, tmp_path, signum,
                                                                                   exit_code, says):
    out = tmp_path / "store"
    with pack_process(slow_model, out) as process:
        partial = tmp_path / f".store.partial-{process.pid}"
        wait_until_midway(process, partial)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], stderr
    assert not out.exists() and partial_folders(tmp_path) == []


def test_a_pack_killed_midway_leaves_a_partial_folder_the_next_pack_names(slow_model, tiny_model_dir, tmp_path):
    with pack_process(slow_model, tmp_path / "store") as process:
        partial = tmp_path / f".store.partial-{process.pid}"
        wait_until_midway(process, partial)
        process.kill()
        process.wait(timeout=60)
    assert (partial / OWNER_FILE).is_file()

    again = subprocess.run([sys.executable, "-m", "coordinator", *pack_args(tiny_model_dir, tmp_path / "other",
                                                                              "--expert-bits", "16")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, again.stderr
    assert str(partial) in warnings[0] and f"pid {process.pid}" in warnings[0] and "rm -r" in warnings[0]
    assert " MB)" in warnings[0] or " KB)" in warnings[0]
    assert partial.is_dir()  # named, not deleted: a pid alone does not prove the folder abandoned
    assert not (tmp_path / "other" / OWNER_FILE).exists()


def test_a_sigterm_that_c_code_turns_into_another_error_still_stops_the_writer_as_sigterm(tmp_path):
    """The SIGTERM handler raises inside whatever runs; a C extension (safetensors reading a
    tensor) may report its own error in its place, which a CI run once showed as exit 3 and
    "cannot read ... (could not determine the shape of ...)". The writer raises the stop instead."""
    from common.store.writer import StoreWriter, WritingStopped

    out = tmp_path / "store"
    with pytest.raises(WritingStopped) as stopped:
        with StoreWriter(out, {}):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs here
            except WritingStopped:
                raise StoreError("model.safetensors: cannot read w1 (could not determine the shape)") from None
    assert stopped.value.exit_code == 143
    assert not out.exists() and partial_folders(tmp_path) == []
