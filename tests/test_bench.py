"""make-synthetic and bench, end to end on the CPU with the small shape (the GPU run of the
Mixtral-8x7B shape is in BENCHMARKS.md)."""

import json

import pytest

from common.errors import ConfigError
from common.store.manifest import Manifest
from coordinator.runtime.engine_options import cache_experts_for_budget


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    from coordinator.tools.synthetic import make_synthetic_store

    out = tmp_path_factory.mktemp("synthetic") / "small"
    make_synthetic_store(shape="small", out=out, expert_bits=2, dense_bits=4, progress=False)
    return out


def test_synthetic_store_has_the_layout_pack_writes(synthetic_store, run_coordinator, tmp_path):
    manifest = Manifest.read(synthetic_store)
    assert manifest.expert_quant.bits == 2 and manifest.dense_quant.bits == 4
    assert manifest.layout.nbytes * 8 / manifest.model.expert_parameters == pytest.approx(2.5, abs=0.01)
    result = run_coordinator("make-synthetic", "--shape", "small", "--out", tmp_path / "s", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "random" in result.stdout
    assert Manifest.read(tmp_path / "s").model_id == manifest.model_id  # same seed, same store


def test_bench_reports_every_mode_with_consistent_counts(synthetic_store, run_coordinator):
    result = run_coordinator("bench", "--store", synthetic_store, "--device", "cpu", "--tokens", "3",
                             "--prompt-tokens", "4", "--warmup-tokens", "1", "--profile-tokens", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    modes = {r["mode"]: r for r in report["results"]}
    assert set(modes) == {"naive", "lru", "lru+prefetch", "resident"}
    layers, top_k = report["layers"], 2
    assert modes["naive"]["hit_rate"] == 0 and modes["naive"]["experts_copied_per_token"] == layers * top_k
    assert modes["resident"]["hit_rate"] == 1 and modes["resident"]["experts_copied_per_token"] == 0
    assert 0 <= modes["lru+prefetch"]["prefetch_recall"] <= 1
    assert "random weights" in report["routing"]
    for r in modes.values():
        assert r["decode_tokens_per_s"] > 0 and set(r["breakdown_ms_per_token"]) >= {"attention", "expert compute"}


def test_gpu_budget_sets_the_slots_per_layer():
    blob, layers = 55_000_000, 32
    assert cache_experts_for_budget(16, dense_bytes=3_300_000_000, blob_bytes=blob, layers=layers, experts=8) == 6
    assert cache_experts_for_budget(80, dense_bytes=3_300_000_000, blob_bytes=blob, layers=layers, experts=8) == 8
    with pytest.raises(ConfigError, match="gpu-budget-gb"):
        cache_experts_for_budget(2, dense_bytes=3_300_000_000, blob_bytes=blob, layers=layers, experts=8)
