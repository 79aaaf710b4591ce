"""Placement per miss (coordinator/runtime/placement.py): with `run` every expert that is not in
the cache runs on this machine's CPU from where it lives, with `auto` each miss goes to the copy
or the run by measured costs; greedy tokens are transformers' either way (through the decode
path, float32 unquantized), every use is counted once (hits + misses + runs elsewhere), and a
run copies nothing into the cache."""

from types import SimpleNamespace

import pytest

from prometheus_client import CollectorRegistry, generate_latest

from common.errors import ConfigError
from coordinator.runtime.engine import Engine
from coordinator.server.metrics import EngineCollector
from conftest import coordinator_cli
from expert_host_processes import expert_hosts  # noqa: F401 (a fixture)

PROMPT = "A small cache on the graphics card keeps the experts"


def generate(store, **options):
    with Engine.open(store, **options) as engine:
        generation = engine.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
        list(generation)
        return generation.token_ids, generation.stats, engine.config


@pytest.fixture(scope="module")
def reference_tokens(store16):
    return generate(store16, cache_experts=8, prefetch=False)[0]


@pytest.mark.parametrize("placement", ["copy", "run", "auto"])
@pytest.mark.parametrize("source", ["ram", "disk"])
def test_greedy_tokens_do_not_depend_on_placement(store16, reference_tokens, placement, source):
    tokens, stats, config = generate(store16, cache_experts=2, placement=placement, source=source)
    assert tokens == reference_tokens
    decode_uses = (len(tokens) - 1) * config.num_layers * config.top_k
    prompt_uses = stats.cache_hits + stats.cache_misses + stats.experts_run_elsewhere - decode_uses
    assert 0 < prompt_uses <= stats.prompt_tokens * config.num_layers * config.top_k  # each used expert once per layer
    if placement == "copy":
        assert stats.experts_run_elsewhere == 0


def test_run_places_every_decode_miss_on_the_cpu_and_copies_only_for_the_prompt(store16):
    _, copied, _ = generate(store16, cache_experts=2, placement="copy", prefetch=False)
    _, ran, _ = generate(store16, cache_experts=2, placement="run", prefetch=False)
    assert ran.experts_run_elsewhere > 0
    assert ran.bytes_fetched < copied.bytes_fetched  # decode misses ran on the CPU instead of being copied


def test_the_cpu_time_of_runs_is_counted_for_stats_and_metrics(store16):
    with Engine.open(store16, cache_experts=2, placement="run", prefetch=False) as engine:
        before = engine.snapshot()
        list(engine.generate(PROMPT, max_new_tokens=4, stop_at_eos=False))
        spent = engine.snapshot().since(before).run_compute_seconds_by_source
        registry = CollectorRegistry()
        registry.register(EngineCollector(engine))
        metrics = generate_latest(registry).decode()
    assert spent["cpu"] > 0
    assert "moe_edge_cpu_expert_run_seconds_total" in metrics


def test_cpu_runs_are_computed_on_the_thread_that_asks_for_them_or_on_a_worker_when_told(store16, reference_tokens,
                                                                                         monkeypatch):
    """By default a run is computed by the token loop's thread when it asks for the result (no
    hand-off); MOE_EDGE_CPU_RUN_THREAD=1 keeps the worker thread. Same tokens either way."""
    import threading

    import torch

    from coordinator.runtime.placement import LocalCpuRunner

    for switch, on_caller in (("0", True), ("1", False)):
        monkeypatch.setenv("MOE_EDGE_CPU_RUN_THREAD", switch)
        with Engine.open(store16, cache_experts=2, placement="run", prefetch=False) as engine:
            runner, threads = engine._runner, []
            assert isinstance(runner, LocalCpuRunner)
            run = runner._run
            runner._run = lambda *args: (threads.append(threading.get_ident()), run(*args))[1]
            hidden = torch.ones(1, engine.config.hidden_size, dtype=engine.dtype)
            pending = runner.start(engine.config.moe_layers[0], [0, 1], hidden, torch.ones(1, 2))
            assert pending.result().shape == (1, engine.config.hidden_size)
            assert (threads == [threading.get_ident()]) == on_caller
        assert generate(store16, cache_experts=2, placement="run")[0] == reference_tokens


def test_a_cpu_run_thread_switch_it_does_not_know_is_refused(store16, monkeypatch):
    monkeypatch.setenv("MOE_EDGE_CPU_RUN_THREAD", "yes")
    with pytest.raises(ConfigError, match="MOE_EDGE_CPU_RUN_THREAD=yes: choose 0"):
        generate(store16, cache_experts=2, placement="run")


def test_quantized_experts_run_on_the_cpu_give_the_same_greedy_tokens(store4):
    assert generate(store4, cache_experts=2, placement="run")[0] == generate(store4, cache_experts=2)[0]


def test_an_unknown_placement_is_refused_in_one_line(store16):
    with pytest.raises(ConfigError, match="--placement"):
        Engine.open(store16, placement="somewhere")
    result = coordinator_cli("generate", "--store", store16, "--prompt", "Hi", "--placement", "somewhere")
    assert result.returncode == 2 and "--placement" in result.stderr


@pytest.mark.parametrize("shards,run_experts,host_args", [(("0-7",), "stream", ()), (("0-5", "3-7", "0-2,6-7"), "stream", ()),
                                                           (("0-7",), "unary", ()), (("0-7",), "stream", ("--threads", "1"))],
                         ids=["one host", "three hosts, two replicas each", "one host, unary calls", "one host on one thread"])
def test_greedy_tokens_with_experts_run_on_expert_hosts_equal_the_in_process_ones(store16, reference_tokens, expert_hosts,
                                                                                   shards, run_experts, host_args):  # noqa: F811
    from common.host_address import HostAddress
    from coordinator.sources.cluster_config import ClusterConfig, PoolSettings
    from coordinator.sources.expert_pool import ExpertPool

    hosts = [expert_hosts.start(store16, "--experts", spec, *host_args) for spec in shards]
    source = ExpertPool.source_factory(ClusterConfig(hosts=tuple(HostAddress.parse(h.address) for h in hosts),
                                                     pool=PoolSettings(run_experts=run_experts)))
    tokens, stats, _ = generate(store16, source=source, cache_experts=2, placement="run")
    assert tokens == reference_tokens and stats.experts_run_elsewhere > 0
    assert sum(stats.run_bytes_by_source.values()) > 0 and sum(stats.run_seconds_by_source.values()) > 0


def test_gpt_oss_experts_with_biases_and_the_clamped_swiglu_run_on_the_cpu_as_on_the_device(tmp_path):
    from coordinator.tools.pack import pack_checkpoint
    from coordinator.tools.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model", family="gpt_oss", num_layers=2, hidden_size=64, intermediate_size=32)
    store = tmp_path / "store"
    pack_checkpoint(model_dir=model, out=store, expert_bits=16, progress=False)
    copied, _, _ = generate(store, cache_experts=1, placement="copy")
    ran, stats, _ = generate(store, cache_experts=1, placement="run")
    assert ran == copied and stats.experts_run_elsewhere > 0


@pytest.mark.parametrize("on_loop", ["0", "1"])
def test_a_host_killed_while_it_runs_experts_costs_no_token(store16, reference_tokens, expert_hosts,  # noqa: F811
                                                            on_loop, monkeypatch):
    """Issue 9: a host that dies during generation with placement run, its RunExpertsStream open,
    hands its experts' runs to a replica; the tokens are the in-process ones, and the dead host is
    marked down. The runs sent from the token loop's thread (blocking streams, the default) and
    through the fetch loop (MOE_EDGE_HOST_RUNS_ON_LOOP=1)."""
    monkeypatch.setenv("MOE_EDGE_HOST_RUNS_ON_LOOP", on_loop)
    from common.host_address import HostAddress
    from coordinator.sources.cluster_config import ClusterConfig
    from coordinator.sources.expert_pool import ExpertPool

    a, b, c = expert_hosts.start_many([(store16, "--experts", spec) for spec in ("0-5", "3-7", "0-2,6-7")])
    source = ExpertPool.source_factory(ClusterConfig(hosts=tuple(HostAddress.parse(h.address) for h in (a, b, c))))
    with Engine.open(store16, source=source, cache_experts=2, placement="run") as engine:
        generation = engine.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
        ran_before_kill = {}
        for count, _ in enumerate(generation, start=1):
            if count == 4:
                ran_before_kill.update(engine.source.runs_by_origin())
                client = next(h.client for h in engine.source._hosts if h.address == a.address)
                stream_open = client.run_stream_open if on_loop == "1" else client.blocking_run_stream_open
                a.kill()
        assert generation.token_ids == reference_tokens
        assert ran_before_kill[a.address] > 0  # A really ran experts before it died...
        assert stream_open  # ...on its RunExpertsStream, open when it was killed
        assert engine.source.host_status()[a.address] is False
        assert engine.source.runs_by_origin()[a.address] == ran_before_kill[a.address]


def test_auto_copies_the_misses_it_runs_elsewhere_into_empty_slots_for_later_uses(store16):
    """A cache that starts empty (a one-token prompt) under auto with copies made to look slow:
    every miss runs on the CPU, and while the link is idle it is also copied into an empty slot,
    so the cache fills and later uses become hits; the tokens are the all-resident ones."""
    with Engine.open(store16, cache_experts=8, prefetch=False) as engine:
        generation = engine.generate([5], max_new_tokens=12, stop_at_eos=False)
        list(generation)
        want = generation.token_ids
    with Engine.open(store16, cache_experts=2, placement="auto", prefetch=False) as engine:
        engine.moe.dispatcher.copy_seconds = 1e9  # a copy never finishes first: every miss runs
        generation = engine.generate([5], max_new_tokens=12, stop_at_eos=False)
        list(generation)
        stats, config = generation.stats, engine.config
        assert generation.token_ids == want
        assert all(len(engine.cache.resident(layer)) == 2 for layer in config.moe_layers)  # filled, nothing evicted
    assert stats.experts_run_elsewhere > 0 and stats.cache_hits > 0 and stats.cache_misses == 0
    assert stats.bytes_fetched == 2 * len(config.moe_layers) * engine.store.blob_nbytes  # one copy per slot, no more


def test_auto_copies_nothing_in_the_background_from_an_expert_host(store16, expert_hosts):  # noqa: F811
    """Over a network the background copies would share the link with the runs (and the host's CPU
    with its fetches): misses auto runs on a host stay there."""
    from common.host_address import HostAddress
    from coordinator.sources.cluster_config import ClusterConfig
    from coordinator.sources.expert_pool import ExpertPool

    host = expert_hosts.start(store16)
    source = ExpertPool.source_factory(ClusterConfig(hosts=(HostAddress.parse(host.address),)))
    with Engine.open(store16, source=source, cache_experts=2, placement="auto", prefetch=False) as engine:
        engine.moe.dispatcher.copy_seconds = 1e9  # every miss runs on the host
        generation = engine.generate([5], max_new_tokens=6, stop_at_eos=False)
        list(generation)
        assert all(engine.cache.resident(layer) == [] for layer in engine.config.moe_layers)
    assert generation.stats.experts_run_elsewhere > 0 and generation.stats.bytes_fetched == 0


class _Cache:
    """What PlacementDispatcher reads of the expert cache: the held experts and the copy backlog."""

    def __init__(self, held: dict[int, list[int]], backlog: int) -> None:
        self.held, self.loader = held, SimpleNamespace(backlog=[None] * backlog)

    def resident(self, layer: int) -> list[int]:
        return self.held.get(layer, [])

    def copy_into_free_slots(self, layer: int, experts: list[int]) -> None:
        pass

    def landed(self, layer: int, experts: list[int]) -> bool:
        return set(experts) <= set(self.resident(layer))


class _Inner:
    def dispatch(self, plan):
        from coordinator.runtime.routing_plan import LayerWork

        self.plan = plan
        return LayerWork(sorted(set(plan.chosen)))


class _Runner:
    copies_cross_its_link = False

    def seconds_per_expert(self) -> float:
        return 0.5


def _dispatched_guesses(copy_seconds: float, backlog: int, layer_seconds: float | None, weigh: str | None = "balanced"):
    from coordinator.runtime.counters import ExpertCounters
    from coordinator.runtime.placement import PlacementDispatcher
    from coordinator.runtime.routing_plan import RoutingPlan

    inner, counters = _Inner(), ExpertCounters(4)
    dispatcher = PlacementDispatcher(_Cache({1: [0, 1], 2: [7]}, backlog), inner, _Runner(), placement="auto",
                                     copy_seconds_per_expert=copy_seconds, counters=counters, weigh_guesses=weigh)
    dispatcher.layer_seconds = layer_seconds
    dispatcher.dispatch(RoutingPlan(1, 1, [0, 1], {2: [7, 3, 4, 5], 3: [6]}))  # both chosen held: no miss
    return inner.plan.guesses, counters.prefetch_left


def test_auto_prefetches_only_the_guesses_whose_copy_lands_before_a_run_would_be_done():
    """Layer 2 starts 0.15 s after layer 1 (the measured pace), a run takes 0.5 s: a guess is worth
    its copy while copy_s * (copies queued before it + 1) <= 0.15 + 0.5 for layer 2 (0.8 for
    layer 3); a held guess is always kept (its LRU place refreshed), and it queues no copy."""
    guesses, left = _dispatched_guesses(copy_seconds=0.25, backlog=0, layer_seconds=0.15)
    assert guesses == {2: [7, 3, 4], 3: [6]}  # 3 and 4 land at 0.25 and 0.5, 5 would at 0.75; 6 lands at 0.75
    assert left == [0, 0, 1, 0]
    guesses, left = _dispatched_guesses(copy_seconds=0.25, backlog=2, layer_seconds=0.15)
    assert guesses == {2: [7], 3: [6]} and left == [0, 0, 3, 0]  # behind two queued copies
    guesses, left = _dispatched_guesses(copy_seconds=1.0, backlog=0, layer_seconds=0.15)
    assert guesses == {2: [7], 3: []} and left == [0, 0, 3, 1]  # a copy slower than a run: nothing to prefetch


def _dispatcher(copy_seconds: float, weigh: str | None = "balanced", cache: _Cache | None = None,
                inner: _Inner | None = None):
    from coordinator.runtime.counters import ExpertCounters
    from coordinator.runtime.placement import PlacementDispatcher

    return PlacementDispatcher(cache or _Cache({}, 0), inner or _Inner(), _Runner(), placement="auto",
                               copy_seconds_per_expert=copy_seconds, counters=ExpertCounters(4), weigh_guesses=weigh)


def test_the_balanced_pace_is_where_the_link_and_the_runner_keep_up_with_each_other():
    """A layer that waits on nothing takes g = 0.1 s, each layer brings n = 2 loads, a run takes
    r = 0.5 s and a copy c = 0.5 s: running m of them and copying 2 - m meet at
    0.1 + 0.5 m = 0.5 (2 - m), m = 0.9, p = 0.55 s: (g + n r) / (1 + r / c). Never longer than
    the pace measured; "measured" weighs by that one alone."""
    dispatcher = _dispatcher(0.5)
    dispatcher.clear_layer_seconds, dispatcher.loads_per_layer, dispatcher.layer_seconds = 0.1, 2.0, 1.0
    assert dispatcher.pace() == pytest.approx(0.55)
    dispatcher.layer_seconds = 0.4
    assert dispatcher.pace() == 0.4
    dispatcher = _dispatcher(0.5, weigh="measured")
    dispatcher.clear_layer_seconds, dispatcher.loads_per_layer, dispatcher.layer_seconds = 0.1, 2.0, 1.0
    assert dispatcher.pace() == 1.0


def test_only_layers_that_waited_on_nothing_time_the_clear_pace():
    dispatcher = _dispatcher(0.5)
    dispatcher._last_plan = (1, 0.0, True)
    dispatcher._time_layer(2, 0.2)
    assert dispatcher.clear_layer_seconds == pytest.approx(0.2) and dispatcher.layer_seconds == pytest.approx(0.2)
    dispatcher._last_plan = (2, 0.2, False)  # layer 2 waited on a copy or a run
    dispatcher._time_layer(3, 0.7)
    assert dispatcher.clear_layer_seconds == pytest.approx(0.2) and dispatcher.layer_seconds == pytest.approx(0.23)
    dispatcher._last_plan = (3, 0.7, True)
    dispatcher._time_layer(0, 0.8)  # the next token: sampling and the head are not a layer's pace
    assert dispatcher.clear_layer_seconds == pytest.approx(0.2) and dispatcher.layer_seconds == pytest.approx(0.23)


def test_weighed_by_the_balanced_pace_auto_prefetches_fewer_guesses_than_by_a_pace_slowed_by_copies():
    """Measured 1 s a layer (the decode waiting on copies), but 0.05 s a layer that waits on
    nothing and one load a layer: the balanced pace is (0.05 + 0.5) / (1 + 0.5 / 0.25) = 0.183 s,
    so layer 2's guesses must land by 0.683 s (3 and 4 do, 5 would at 0.75) and layer 3's by 0.867."""
    from coordinator.runtime.routing_plan import RoutingPlan

    for weigh, expected in (("measured", {2: [7, 3, 4, 5], 3: [6]}), ("balanced", {2: [7, 3, 4], 3: [6]})):
        inner = _Inner()
        dispatcher = _dispatcher(0.25, weigh, _Cache({1: [0, 1], 2: [7]}, 0), inner)
        dispatcher.layer_seconds, dispatcher.clear_layer_seconds, dispatcher.loads_per_layer = 1.0, 0.05, 1.0
        dispatcher.dispatch(RoutingPlan(1, 1, [0, 1], {2: [7, 3, 4, 5], 3: [6]}))
        assert inner.plan.guesses == expected, weigh
        assert dispatcher.loads_per_layer == pytest.approx(0.9 + 0.1 * (len(expected[2]) - 1 + 1))  # the new copies


def test_a_copy_of_a_miss_is_charged_the_delay_it_gives_the_next_layers_prefetches():
    """Copy 0.4 s, run 0.5 s, nothing queued, misses 2 and 3: with nothing to prefetch the first
    is copied (0.4 < 0.5) and the second run; where the plan prefetches for a later layer each
    copy costs 0.8 (its prefetches wait behind it), so the first runs and the second is copied."""
    from coordinator.runtime.routing_plan import RoutingPlan

    for guesses, ran in (({2: [7]}, [3]), ({2: [7, 5]}, [2])):  # 7 is held; 5 is a copy to make
        dispatcher = _dispatcher(0.4, None, _Cache({1: [0, 1], 2: [7]}, 0))
        assert dispatcher.dispatch(RoutingPlan(1, 1, [2, 3], guesses)).elsewhere == ran, guesses


def test_a_weighing_switch_it_does_not_know_is_refused(monkeypatch):
    monkeypatch.setenv("MOE_EDGE_WEIGH_GUESSES", "fast")
    with pytest.raises(ConfigError, match="MOE_EDGE_WEIGH_GUESSES=fast: choose 1, measured, 0"):
        _dispatcher(0.5, weigh="")


def test_auto_prefetches_every_guess_before_it_knows_the_pace_or_when_told_not_to_weigh():
    every = {2: [7, 3, 4, 5], 3: [6]}
    assert _dispatched_guesses(copy_seconds=1.0, backlog=0, layer_seconds=None)[0] == every
    assert _dispatched_guesses(copy_seconds=1.0, backlog=0, layer_seconds=0.1, weigh=None)[0] == every


def test_auto_with_a_slow_link_leaves_the_guesses_to_the_cpu_and_keeps_the_tokens(store16, reference_tokens):
    """Copies made to look slower than runs: after the first decode token (which measures the
    pace) no guess is prefetched, the uses they would have served run on the CPU, and the greedy
    tokens are the reference's."""
    with Engine.open(store16, cache_experts=2, placement="auto") as engine:
        engine.moe.dispatcher.copy_seconds = 1e9
        generation = engine.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
        list(generation)
    stats = generation.stats
    assert generation.token_ids == reference_tokens
    assert stats.prefetch_left > 0 and stats.experts_run_elsewhere > 0
