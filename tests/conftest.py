"""Shared fixtures: a tiny random Mixtral made with transformers (fixed seed) and stores packed
from it, once per test session. Nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_module(module: str, *args: str, timeout: float = 300, cwd: Path | None = None,
               env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS...` as a user would, capturing its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env, **kwargs,
    )


@pytest.fixture
def run_coordinator():
    def run(*args, **kwargs) -> subprocess.CompletedProcess:
        return run_module("coordinator", *args, **kwargs)

    return run


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
