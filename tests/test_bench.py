"""make-synthetic and bench, end to end on the CPU with the small shape (the GPU run of the
Mixtral-8x7B shape is in BENCHMARKS.md)."""

import json

import pytest

from common.errors import ConfigError
from expert_host_processes import expert_hosts  # noqa: F401 (a fixture)
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
    assert report["host_load"]["cores"] >= 1 and report["host_load"]["others_cores"] >= 0


def test_the_host_load_counts_other_processes_cpu_not_this_ones(monkeypatch):
    from coordinator.bench import host_load

    clock = {"wall": 100.0, "all": 50.0, "own": 20.0}
    monkeypatch.setattr(host_load.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(host_load, "_all_busy_seconds", lambda: clock["all"])
    monkeypatch.setattr(host_load, "_own_seconds", lambda: clock["own"])
    meter = host_load.HostLoadMeter().start()
    clock.update(wall=110.0, all=50.0 + 30.0, own=20.0 + 12.0)  # 10 s: 30 core-seconds, 12 of them ours
    load = meter.stop()
    assert load.others_cores == pytest.approx(1.8) and load.busy
    assert "1.8 of them busy" in load.describe() and "reads prompts and CPU runs low" in load.describe()
    assert not host_load.HostLoad(16, 0.2).busy and "low" not in host_load.HostLoad(16, 0.2).describe()


def test_gpu_budget_sets_the_slots_per_layer():
    blob, layers = 55_000_000, 32
    assert cache_experts_for_budget(16, dense_bytes=3_300_000_000, blob_bytes=blob, layers=layers, experts=8) == 6
    assert cache_experts_for_budget(80, dense_bytes=3_300_000_000, blob_bytes=blob, layers=layers, experts=8) == 8
    with pytest.raises(ConfigError, match="gpu-budget-gb"):
        cache_experts_for_budget(2, dense_bytes=3_300_000_000, blob_bytes=blob, layers=layers, experts=8)


BENCH_SHORT = ("--device", "cpu", "--tokens", "3", "--prompt-tokens", "4", "--warmup-tokens", "1", "--profile-tokens", "1")


def _check_placed_counts(report: dict, where: str) -> dict:
    results = {(r["mode"], r["placement"]): r for r in report["results"]}
    uses_per_token = report["layers"] * 2  # top-2
    for r in results.values():
        assert r["hits_per_token"] + r["misses_per_token"] + r["runs_elsewhere_per_token"] == pytest.approx(uses_per_token)
    run = results[("lru+prefetch", "run")]
    assert run["misses_per_token"] == 0 and run["runs_elsewhere_per_token"] > 0 and run["run_wait_ms_per_token"] >= 0
    assert results[("lru+prefetch", "copy")]["runs_elsewhere_per_token"] == 0
    assert report["runs_elsewhere_on"] == where and report["prepare_runs_s"] >= 0
    return results


def test_bench_runs_each_mode_with_each_placement_asked_naive_and_resident_only_copy(synthetic_store, run_coordinator):
    result = run_coordinator("bench", "--store", synthetic_store, *BENCH_SHORT, "--placements", "copy,run,auto", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    results = _check_placed_counts(report, "cpu")
    assert set(results) == {("naive", "copy"), ("resident", "copy"), *((m, p) for m in ("lru", "lru+prefetch")
                                                                       for p in ("copy", "run", "auto"))}
    assert set(results[("naive", "copy")]["bytes_per_token_by_link"]) == {"ram"}
    assert results[("lru", "run")]["bytes_per_token_by_link"] == {}  # nothing copied after the prompt's experts


def test_bench_with_experts_on_a_host_counts_both_directions_of_its_link(synthetic_store, run_coordinator, expert_hosts):  # noqa: F811
    host = expert_hosts.start(synthetic_store)
    result = run_coordinator("bench", "--store", synthetic_store, *BENCH_SHORT, "--modes", "lru+prefetch",
                             "--placements", "copy,run", "--hosts", host.address, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    results = _check_placed_counts(report, "host")
    link = results[("lru+prefetch", "run")]["bytes_per_token_by_link"][host.address]
    hidden = 256 * 4  # one token's float32 hidden state (the small shape)
    assert link["run_sent"] > hidden and link["run_received"] >= hidden  # per layer that ran experts there
    assert results[("lru+prefetch", "run")]["host_run_ms_per_token"] > results[("lru+prefetch", "run")]["host_compute_ms_per_token"] > 0


def test_bench_refuses_a_placement_pair_list_with_nothing_to_run(synthetic_store, run_coordinator):
    result = run_coordinator("bench", "--store", synthetic_store, *BENCH_SHORT, "--modes", "naive", "--placements", "run")
    assert result.returncode != 0 and "nothing to run" in result.stderr
