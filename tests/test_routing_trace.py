"""Routing traces: recorded from the tiny model's generate, replayed by the engine and by bench
(runtime/routing_trace.py). A replay must load, prefetch and run exactly what the recording did,
cycle a trace's layers over a deeper store, and refuse a trace that does not fit or is broken."""

import dataclasses
import json

import pytest

from common.errors import ConfigError, StoreError
from conftest import coordinator_cli, requires_cuda
from coordinator.bench.decode import run_bench
from coordinator.runtime.engine import Engine
from coordinator.runtime.engine_options import EngineOptions
from coordinator.runtime.routing_trace import RoutingRecorder, RoutingTrace, locality

PROMPT = "Hello world, the experts come to the card"
NEW_TOKENS = 10
K = 3  # slots per layer: fewer than the 8 experts, so there are misses and evictions


class _WindowCounts:
    """Wraps a hook; keeps the engine's counters as the first decode step begins, so a test can
    read what the decode steps alone did (bench times only those)."""

    def __init__(self, engine: Engine, inner) -> None:
        self.engine, self.inner, self.at_first_decode = engine, inner, None

    def begin_step(self, kind, tokens):
        if kind == "decode" and self.at_first_decode is None:
            self.at_first_decode = self.engine.snapshot()
        self.inner.begin_step(kind, tokens)

    def on_plan(self, plan, layers_ahead):
        return self.inner.on_plan(plan, layers_ahead)


class _Chain:
    """Replay, then record what the replay handed on."""

    def __init__(self, first, then) -> None:
        self.first, self.then = first, then

    def begin_step(self, kind, tokens):
        self.first.begin_step(kind, tokens)
        self.then.begin_step(kind, tokens)

    def on_plan(self, plan, layers_ahead):
        return self.then.on_plan(self.first.on_plan(plan, layers_ahead), layers_ahead)


def _record(store, *, prefetch: bool):
    """A greedy generate from a cold cache, recorded: (trace, token ids, decode-window counts)."""
    with Engine.open(store, cache_experts=K, prefetch=prefetch) as engine:
        recorder = engine.record_routing(made_by={"model": "tiny"})
        window = _WindowCounts(engine, recorder)
        engine._set_routing_hook(window)
        generation = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        list(generation)
        return recorder.trace(), generation.token_ids, engine.snapshot().since(window.at_first_decode)


def _recorder_for(engine: Engine) -> RoutingRecorder:
    c = engine.config
    return RoutingRecorder(moe_layers=c.moe_layers, experts=c.num_experts, top_k=c.top_k,
                           lookahead_depth=engine.options.depth, lookahead_width=engine.options.prefetch_width)


@pytest.fixture(scope="module")
def recorded(store16):
    return _record(store16, prefetch=True)


@pytest.fixture(scope="module")
def trace_file(recorded, tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "tiny.trace.jsonl"
    recorded[0].write(path)
    return path


def test_recording_changes_no_greedy_token(store16, recorded):
    with Engine.open(store16, cache_experts=K) as engine:
        generation = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        list(generation)
    assert generation.token_ids == recorded[1]


def test_a_trace_holds_the_prompt_then_every_decode_step_and_reads_back_equal(recorded, trace_file):
    trace = recorded[0]
    assert trace.steps[0].kind == "prompt" and all(s.kind == "decode" for s in trace.steps[1:])
    assert trace.decode_steps == NEW_TOKENS - 1  # the first new token comes from the prompt's logits
    assert [s.tokens[0] for s in trace.steps[1:]] == recorded[1][:-1]
    assert (trace.experts, trace.top_k, trace.moe_layers, trace.lookahead_depth, trace.lookahead_width) == (8, 2, 4, 1, 2)
    assert all(len(s.guesses[layer]) == (1 if layer < 3 else 0) for s in trace.steps for layer in range(4))
    assert RoutingTrace.read(trace_file) == trace
    header = json.loads(trace_file.read_text().splitlines()[0])
    assert header["format"] == "moe-edge-routing-trace" and header["version"] == 1
    rows = locality(trace)
    assert len(rows) == 4 and all(0 <= row.reuse <= 1 and row.random_reuse == 0.25 for row in rows)


def test_a_replay_routes_another_prompt_exactly_as_recorded(store16, recorded):
    trace, _, _ = recorded
    with Engine.open(store16, cache_experts=K) as engine:
        replay = engine.replay_routing(trace)
        again = _recorder_for(engine)
        engine._set_routing_hook(_Chain(replay, again))
        other_prompt = [1] + [7] * (trace.prompt_tokens - 1)  # routes differently by its own router
        list(engine.generate(other_prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False))
    replayed = again.trace()
    assert [s.experts for s in replayed.steps] == [s.experts for s in trace.steps]
    assert [s.guesses for s in replayed.steps] == [s.guesses for s in trace.steps]


@pytest.mark.parametrize("mode", ["lru", "lru+prefetch"])
def test_bench_replay_hits_and_misses_match_the_recorded_generate(store16, recorded, trace_file, mode):
    trace = recorded[0]
    expected = recorded[2] if mode == "lru+prefetch" else _record(store16, prefetch=False)[2]
    report = run_bench(store=store16, options=EngineOptions(cache_experts=K), tokens=trace.decode_steps,
                       warmup_tokens=0, profile_tokens=1, modes=(mode,), routing=trace_file)
    result = report.results[0]
    assert result.hit_rate == pytest.approx(expected.total("hits") / expected.uses)
    assert result.experts_copied_per_token == pytest.approx(expected.experts_copied / trace.decode_steps)
    if mode == "lru+prefetch":
        assert expected.total("prefetch_issued") > 0
        assert result.prefetch_precision == pytest.approx(expected.total("prefetch_hits") / expected.total("prefetch_issued"))
    assert report.prompt_tokens == trace.prompt_tokens
    assert report.routing.startswith(f"replayed from {trace_file}")
    assert "wrap around" in report.routing  # the profile pass runs one step past the trace


@requires_cuda
@pytest.mark.parametrize("mode", ["lru", "lru+prefetch"])
def test_bench_replay_through_cuda_graphs_matches_the_recorded_generate(store16, recorded, trace_file, mode):
    """The decoder's graphs find each expert's top-k position by plan.chosen.index: a replayed
    plan must keep that consistent, and the counts those of the CPU recording."""
    trace = recorded[0]
    expected = recorded[2] if mode == "lru+prefetch" else _record(store16, prefetch=False)[2]
    report = run_bench(store=store16, options=EngineOptions(device="cuda", cache_experts=K), tokens=trace.decode_steps,
                       warmup_tokens=0, profile_tokens=1, modes=(mode,), routing=trace_file)
    assert report.cuda_graphs
    assert report.results[0].hit_rate == pytest.approx(expected.total("hits") / expected.uses)
    assert report.results[0].experts_copied_per_token == pytest.approx(expected.experts_copied / trace.decode_steps)


@pytest.fixture(scope="module")
def deeper_store(tmp_path_factory):
    from coordinator.tools.pack import pack_checkpoint
    from coordinator.tools.tiny_model import make_tiny_model

    folder = tmp_path_factory.mktemp("deeper")
    make_tiny_model(folder / "model", seed=1, num_layers=6)
    pack_checkpoint(model_dir=folder / "model", out=folder / "store", expert_bits=16, dense_bits=16, progress=False)
    return folder / "store"


def test_a_deeper_store_cycles_the_trace_layers(deeper_store, recorded):
    trace = recorded[0]
    with Engine.open(deeper_store, cache_experts=K) as engine:
        replay = engine.replay_routing(trace)
        again = _recorder_for(engine)
        engine._set_routing_hook(_Chain(replay, again))
        list(engine.generate([1] * trace.prompt_tokens, max_new_tokens=trace.decode_steps + 3, stop_at_eos=False))
    assert replay.wraps == 1
    replayed = again.trace()
    steps = trace.steps + trace.steps[1:4]  # three decode steps past the end start over at the first
    for step, original in zip(replayed.steps, steps):
        assert step.experts == [original.experts[layer % 4] for layer in range(6)]
        # the trace's last layer had no layer ahead, so store layer 3 prefetches nothing
        assert step.guesses == [original.guesses[0], original.guesses[1], original.guesses[2], [],
                                original.guesses[0], []]


def test_a_trace_of_other_experts_or_top_k_is_refused_naming_both(store16, recorded):
    with Engine.open(store16, cache_experts=K) as engine:
        for changed, words in ((dict(experts=16), "16 experts per layer and top-2"), (dict(top_k=1), "top-1")):
            with pytest.raises(ConfigError, match="this store has 8 experts per layer and top-2") as refused:
                engine.replay_routing(dataclasses.replace(recorded[0], **changed), source="t.jsonl")
            assert words in str(refused.value) and "t.jsonl" in str(refused.value)


def test_a_replayed_prompt_of_another_length_is_refused(store16, recorded):
    with Engine.open(store16, cache_experts=K) as engine:
        engine.replay_routing(recorded[0])
        with pytest.raises(ConfigError, match=f"the trace's {recorded[0].prompt_tokens} tokens"):
            list(engine.generate([1, 2, 3], max_new_tokens=2))


@pytest.mark.parametrize("damage, words", [
    (lambda lines: lines[:-2], "truncated"),
    (lambda lines: [lines[0].replace('"version": 1', '"version": 2')] + lines[1:], "version 2"),
    (lambda lines: ["{not json"] + lines[1:], "not JSON"),
    (lambda lines: lines[:1] + [lines[1].replace("[", "[99,", 3)] + lines[2:], "step 0"),
    (lambda lines: [], "line 1"),
])
def test_a_broken_trace_file_is_refused_naming_the_file(trace_file, tmp_path, damage, words):
    broken = tmp_path / "broken.trace.jsonl"
    broken.write_text("\n".join(damage(trace_file.read_text().splitlines())) + "\n")
    with pytest.raises(StoreError, match=str(broken)) as refused:
        RoutingTrace.read(broken)
    assert words in str(refused.value)


def test_generate_records_and_bench_replays_from_the_command_line(store16, tmp_path):
    trace = tmp_path / "cli.trace.jsonl"
    made = coordinator_cli("generate", "--store", store16, "--prompt", PROMPT, "--max-new-tokens", 4,
                           "--record-routing", trace)
    assert made.returncode == 0, made.stderr
    assert RoutingTrace.read(trace).made_by["command"] == "generate"
    bench = coordinator_cli("bench", "--store", store16, "--routing", trace, "--tokens", 2, "--warmup-tokens", 0,
                            "--profile-tokens", 1, "--modes", "lru", "--json")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["routing"].startswith(f"replayed from {trace}")
    missing = coordinator_cli("bench", "--store", store16, "--routing", tmp_path / "none.jsonl", "--modes", "lru")
    assert missing.returncode == StoreError.exit_code and "none.jsonl" in missing.stderr
