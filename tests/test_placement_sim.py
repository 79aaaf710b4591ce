"""scripts/placement_sim.py, the model of the decode's timeline that weighs placement auto's rules
without a GPU: it drives the real PlacementDispatcher, so it must keep up with its interface."""

from types import SimpleNamespace

from scripts.placement_sim import simulate


def _args(**costs):
    defaults = dict(tokens=6, warmup=2, layers=8, experts=8, slots=4, copy_ms=1.0, run_ms=1.0, gpu_ms=0.05,
                    layer_ms=0.25, head_ms=0.5, wrong=0.05)
    return SimpleNamespace(**{**defaults, **costs})


def test_copy_never_runs_and_auto_runs_more_as_copies_get_slower():
    copied = simulate("copy", None, False, _args())
    assert copied["runs"] == 0 and copied["copies"] > 0
    fast_link = simulate("auto", "balanced", True, _args(copy_ms=0.1))
    slow_link = simulate("auto", "balanced", True, _args(copy_ms=10.0))
    assert slow_link["runs"] > fast_link["runs"]
    assert slow_link["copies"] < fast_link["copies"]
