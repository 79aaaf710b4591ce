"""Shared fixtures: a tiny random Mixtral made with transformers (fixed seed) and stores packed
from it, once per test session; the HTTP servers and the expert host that several test files
share; and run_cli, which calls a command line's main() in this process. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from coordinator.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-mixtral", seed=0)


def _pack(tmp_path_factory, model_dir: Path, name: str, **kwargs) -> Path:
    from coordinator.tools.pack import pack_checkpoint

    out = tmp_path_factory.mktemp("stores") / name
    pack_checkpoint(model_dir=model_dir, out=out, progress=False, **kwargs)
    return out


@pytest.fixture(scope="session")
def store16(tmp_path_factory, tiny_model_dir) -> Path:
    """Unquantized experts and attention (float32, as the checkpoint)."""
    return _pack(tmp_path_factory, tiny_model_dir, "store16", expert_bits=16, dense_bits=16)


@pytest.fixture(scope="session")
def store4(tmp_path_factory, tiny_model_dir) -> Path:
    """4-bit HQQ experts (group 64), 4-bit attention."""
    return _pack(tmp_path_factory, tiny_model_dir, "store4", expert_bits=4, dense_bits=4)


@pytest.fixture(scope="session")
def store2(tmp_path_factory, tiny_model_dir) -> Path:
    """2-bit HQQ experts (group 64), unquantized attention."""
    return _pack(tmp_path_factory, tiny_model_dir, "store2", expert_bits=2, dense_bits=16)


@pytest.fixture(scope="session")
def shared_server(store16):
    """One server on store16 (no key, the default queue) for every test file that neither stops
    it nor counts on fresh metrics: tests read metrics as differences."""
    from http_server_fixtures import running_server

    with running_server(store16) as running:
        yield running


@pytest.fixture(scope="session")
def shared_keyed_server(store16):
    """One server on store16 wanting http_server_fixtures.API_KEY, with no room to wait
    (max_queue 0), shared like `shared_server`. A test that leaves a request generating waits for
    it to stop, or the next one would get 429."""
    from http_server_fixtures import API_KEY, running_server

    with running_server(store16, api_key=API_KEY, max_queue=0) as running:
        yield running


@pytest.fixture(scope="session")
def shared_store16_host(tmp_path_factory, store16):
    """One real expert host holding all of store16 in RAM, for the test files that neither kill
    it nor stop it (fetch counts are per engine or per pool, so sharing changes none)."""
    from expert_host_processes import HostLauncher

    launcher = HostLauncher(tmp_path_factory.mktemp("shared-host"))
    try:
        yield launcher.start(store16)
    finally:
        launcher.close()


def run_module(module: str, *args: str, timeout: float = 300, cwd: Path | None = None,
               env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS...` as a user would, capturing its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env, **kwargs,
    )


def check_seed() -> int:
    """The seed the kernel checks run with: $MOE_EDGE_CHECK_SEED, a number or "random" (a fresh
    one each run, to hunt for inputs a bound misses); 11 when unset, so that CI runs the inputs it
    ran before (a fresh seed each CI run once failed a bound that was too tight under the
    interpreter, tests/decode_attention_check.py; 11 passed every check on the CPU, 2026-12-01)."""
    chosen = os.environ.get("MOE_EDGE_CHECK_SEED", "11")
    return random.randrange(2**31) if chosen == "random" else int(chosen)


def check_kernels(module: str, device: str, timeout: float = 600) -> None:
    """Run a kernel check module (tests/*_check.py) on `device` in a process of its own: on "cpu"
    under Triton's interpreter (TRITON_INTERPRET is read when triton is imported), with
    check_seed(). Its output, whose first line is the command to rerun it with, is printed; no
    case may fail."""
    env = {"TRITON_INTERPRET": "1"} if device == "cpu" else None
    result = run_module(module, device, check_seed(), env_extra=env, timeout=timeout)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


@pytest.fixture
def run_coordinator():
    def run(*args, **kwargs) -> subprocess.CompletedProcess:
        return run_module("coordinator", *args, **kwargs)

    return run


@dataclass(frozen=True)
class CliResult:
    """What a command line left behind, named as in subprocess.CompletedProcess."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(main, *args) -> CliResult:
    """Call a command line's `main([...])` in this process, as `python -m ...` would run it, but
    without a new interpreter (and its seconds of imports). argparse's exits (--help, a bad
    flag) become the return code. Use a subprocess instead where the point is a signal, a child
    process, a real process's stdin/stdout, or an effect at import time."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            returncode = main([str(arg) for arg in args])
        except SystemExit as stopped:  # as the interpreter reads it: None is success, a message failure
            returncode = stopped.code if isinstance(stopped.code, int) else (0 if stopped.code is None else 1)
    return CliResult(returncode, stdout.getvalue(), stderr.getvalue())


def coordinator_cli(*args) -> CliResult:
    """`python -m coordinator ARGS...`, in this process."""
    from coordinator.cli import main

    return run_cli(main, *args)


def expert_host_cli(*args) -> CliResult:
    """`python -m expert_host ARGS...`, in this process."""
    from expert_host.cli import main

    return run_cli(main, *args)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
