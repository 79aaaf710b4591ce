"""Routing traces: which experts a model's routers chose, token by token, kept in a file and
replayed on another store.

Random weights route with no temporal locality, so cache and prefetch figures measured on a
synthetic store say little about a real model. A trace recorded from a trained model and
replayed on a synthetic store of real shapes does: the cache then loads, the prefetcher then
asks for, and the decoder then runs the experts the trained model chose.

A trace holds one generation, in steps: the prompt (one plan read-back for all its tokens),
then one decode step per token. For each step and each layer with experts it keeps the experts
each token chose (its top-k, best first) and the router lookahead's guesses for the layers
ahead: what the prefetcher was told to load. `RoutingRecorder` takes both from the MoE block's
plan read-back (moe.MoEBlock.read_plan); `RoutingReplay` puts the trace's in their place there.
Both are a `RoutingHook`, which the engine tells where each step begins. `RoutingTrace` writes
and reads the file; `locality` says how much a token's experts repeat the previous token's.

The file (version 1) is JSON lines, UTF-8, no pickle:
  line 1, the header: {"format": "moe-edge-routing-trace", "version": 1, "experts": E,
      "top_k": k, "moe_layers": L, "lookahead_depth": D, "lookahead_width": W,
      "prompt_tokens": P, "decode_steps": S, "made_by": {free-form: model, store, how}}
  then 1 + S lines, one per step, in order:
      {"step": 0, "kind": "prompt", "tokens": [P token ids],
       "experts": [L lists of P lists of k experts], "guesses": [L lists of up to D lists of 1..E]}
      {"step": 1, "kind": "decode", "tokens": [1 id], "experts": [L lists of 1 list of k], ...}
Layers count only the layers with experts (a dense layer is not in a trace). guesses[l][d-1] is
the guess made at layer l for the d-th layer with experts after it: fewer near the last layer,
none at all when the recording ran without prefetch (D = 0).

Replay rules. The store must have the trace's experts per layer and top-k (else ConfigError
naming both). Its layer with experts number m uses the trace's layer m % L, so a deeper store
cycles the trace's layers; at the trace's last layer there is no recorded guess (the trained
model had no layer ahead of it), so nothing is prefetched from those layers. Guesses are
replayed as recorded, to at most the engine's own lookahead depth, and only while prefetch is
on. A replayed prompt must have the trace's prompt length (bench uses it); decode steps after
the trace's last one wrap around to its first decode step (`wraps` counts how often), so the
seam is the one place where consecutive steps are not consecutive text.

Imports no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common.errors import ConfigError, StoreError

from .routing_plan import RoutingPlan

FORMAT = "moe-edge-routing-trace"
VERSION = 1


class RoutingHook(Protocol):
    def begin_step(self, kind: str, tokens: list[int]) -> None:
        """A prompt ("prompt", its ids) or a decode step ("decode", [its token]) starts."""

    def on_plan(self, plan: RoutingPlan, layers_ahead: list[int]) -> RoutingPlan:
        """The plan read back from the device -> the plan the layer goes on with.
        `layers_ahead`: the layers the engine's lookahead guesses for ([] without prefetch)."""


@dataclass
class TraceStep:
    kind: str  # "prompt" or "decode"
    tokens: list[int]
    experts: list[list[list[int]]]  # [L][T][k]
    guesses: list[list[list[int]]]  # [L][<= D][W]


@dataclass
class RoutingTrace:
    experts: int  # experts per layer
    top_k: int
    moe_layers: int
    lookahead_depth: int
    lookahead_width: int
    steps: list[TraceStep]
    made_by: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.steps[0].tokens) if self.steps else 0

    @property
    def decode_steps(self) -> int:
        return len(self.steps) - 1 if self.steps else 0

    def header(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "experts": self.experts, "top_k": self.top_k,
                "moe_layers": self.moe_layers, "lookahead_depth": self.lookahead_depth,
                "lookahead_width": self.lookahead_width, "prompt_tokens": self.prompt_tokens,
                "decode_steps": self.decode_steps, "made_by": self.made_by}

    def write(self, path: str | Path) -> None:
        lines = [json.dumps(self.header())]
        for index, step in enumerate(self.steps):
            lines.append(json.dumps({"step": index, "kind": step.kind, "tokens": step.tokens,
                                     "experts": step.experts, "guesses": step.guesses}, separators=(",", ":")))
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> "RoutingTrace":
        """Read and check a trace file; StoreError naming the file for anything malformed."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise StoreError(f"{path}: cannot read the routing trace ({err})") from None
        try:
            return cls._parse(lines)
        except _Malformed as err:
            raise StoreError(f"{path}: not a valid routing trace: {err}") from None

    @classmethod
    def _parse(cls, lines: list[str]) -> "RoutingTrace":
        header = _json_object(lines[0] if lines else "", "line 1 (the header)")
        if header.get("format") != FORMAT:
            raise _Malformed(f"format is {header.get('format')!r}, expected {FORMAT!r}")
        if header.get("version") != VERSION:
            raise _Malformed(f"version {header.get('version')!r}; this reader knows version {VERSION}")
        sizes = {name: header.get(name) for name in ("experts", "top_k", "moe_layers", "lookahead_depth",
                                                        "lookahead_width", "prompt_tokens", "decode_steps")}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _Malformed(f"header field {name} is {value!r}, expected a whole number")
        if not 1 <= sizes["top_k"] <= sizes["experts"] or sizes["moe_layers"] < 1 or sizes["prompt_tokens"] < 1:
            raise _Malformed(f"header sizes make no trace: {sizes}")
        made_by = header.get("made_by", {})
        if not isinstance(made_by, dict):
            raise _Malformed(f"header field made_by is {made_by!r}, expected an object")
        trace = cls(sizes["experts"], sizes["top_k"], sizes["moe_layers"], sizes["lookahead_depth"],
                    sizes["lookahead_width"], [], made_by)
        body = [line for line in lines[1:] if line.strip()]
        if len(body) != 1 + sizes["decode_steps"]:
            raise _Malformed(f"{len(body)} step lines, the header promises {1 + sizes['decode_steps']} (truncated?)")
        for index, line in enumerate(body):
            trace.steps.append(trace._parse_step(index, _json_object(line, f"line {index + 2}"), sizes["prompt_tokens"]))
        return trace

    def _parse_step(self, index: int, record: dict, prompt_tokens: int) -> TraceStep:
        where = f"step {index}"
        kind = "prompt" if index == 0 else "decode"
        if record.get("step") != index or record.get("kind") != kind:
            raise _Malformed(f"{where}: expected step {index} of kind {kind!r}, got {record.get('step')!r} "
                             f"{record.get('kind')!r}")
        tokens, experts, guesses = record.get("tokens"), record.get("experts"), record.get("guesses")
        count = prompt_tokens if index == 0 else 1
        if not _ints(tokens) or len(tokens) != count:
            raise _Malformed(f"{where}: tokens must be {count} token ids")
        if not isinstance(experts, list) or len(experts) != self.moe_layers:
            raise _Malformed(f"{where}: experts must hold {self.moe_layers} layers")
        for layer, per_token in enumerate(experts):
            if not isinstance(per_token, list) or len(per_token) != count:
                raise _Malformed(f"{where}, layer {layer}: experts for {count} tokens expected")
            for chosen in per_token:
                if not self._expert_list(chosen, self.top_k) or len(set(chosen)) != self.top_k:
                    raise _Malformed(f"{where}, layer {layer}: {chosen!r} is not {self.top_k} distinct experts "
                                     f"in 0-{self.experts - 1}")
        if not isinstance(guesses, list) or len(guesses) != self.moe_layers:
            raise _Malformed(f"{where}: guesses must hold {self.moe_layers} layers")
        # A prompt guesses as many experts per layer ahead as a layer has slots (prefetcher.py), a
        # decode step the lookahead's width.
        widths = range(1, self.experts + 1) if kind == "prompt" else (self.lookahead_width,)
        for layer, ahead in enumerate(guesses):
            if (not isinstance(ahead, list) or len(ahead) > self.lookahead_depth
                    or not all(_ints(g) and len(g) in widths and self._expert_list(g, len(g)) for g in ahead)):
                width = f"1-{self.experts}" if kind == "prompt" else str(self.lookahead_width)
                raise _Malformed(f"{where}, layer {layer}: guesses must be up to {self.lookahead_depth} lists of "
                                 f"{width} experts in 0-{self.experts - 1}")
        return TraceStep(kind, tokens, experts, guesses)

    def _expert_list(self, values, length: int) -> bool:
        return _ints(values) and len(values) == length and all(0 <= v < self.experts for v in values)


class _Malformed(Exception):
    pass


def _json_object(line: str, where: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise _Malformed(f"{where} is not JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise _Malformed(f"{where} is not a JSON object")
    return value


def _ints(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


class RoutingRecorder:
    """A RoutingHook that keeps what each step's plans say and changes nothing."""

    def __init__(self, *, moe_layers: list[int], experts: int, top_k: int, lookahead_depth: int,
                 lookahead_width: int, made_by: dict | None = None) -> None:
        self._ordinal = {layer: index for index, layer in enumerate(moe_layers)}
        self._sizes = (experts, top_k, len(moe_layers), lookahead_depth, lookahead_width)
        self.made_by = dict(made_by or {})
        self.steps: list[TraceStep] = []

    def begin_step(self, kind: str, tokens: list[int]) -> None:
        if kind == "prompt" and self.steps:
            raise ConfigError("a routing trace holds one generation: this recorder already has a prompt "
                              "(record the next one with a new recorder)")
        if kind == "decode" and not self.steps:
            raise ConfigError("a routing trace starts with its prompt; this decode step has none before it")
        layers = len(self._ordinal)
        self.steps.append(TraceStep(kind, list(tokens), [[] for _ in range(layers)], [[] for _ in range(layers)]))

    def on_plan(self, plan: RoutingPlan, layers_ahead: list[int]) -> RoutingPlan:
        step, index, k = self.steps[-1], self._ordinal[plan.layer], self._sizes[1]
        step.experts[index] = [plan.chosen[t * k:(t + 1) * k] for t in range(plan.tokens)]
        step.guesses[index] = [plan.guesses[later] for later in layers_ahead if later in plan.guesses]
        return plan

    def trace(self) -> RoutingTrace:
        """What was recorded, as a trace (checked: every layer of every step read back)."""
        if not self.steps:
            raise ConfigError("nothing was recorded: no prompt went through the engine while recording")
        if any(not per_token for step in self.steps for per_token in step.experts):
            raise ConfigError("a recorded step lacks a layer's routing (was it cancelled mid-step?)")
        experts, top_k, layers, depth, width = self._sizes
        return RoutingTrace(experts, top_k, layers, depth, width, list(self.steps), self.made_by)


class RoutingReplay:
    """A RoutingHook that puts the trace's experts and guesses in place of the router's (see the
    module's replay rules). `wraps` counts the times the decode steps started over."""

    def __init__(self, trace: RoutingTrace, *, moe_layers: list[int], experts: int, top_k: int,
                 source: str = "the trace") -> None:
        if (trace.experts, trace.top_k) != (experts, top_k):
            raise ConfigError(f"{source} was recorded with {trace.experts} experts per layer and top-{trace.top_k}; "
                              f"this store has {experts} experts per layer and top-{top_k}: a replay needs both equal")
        self.trace = trace
        self._trace_layer = {layer: index % trace.moe_layers for index, layer in enumerate(moe_layers)}
        self._step: TraceStep | None = None
        self._index = 0
        self.wraps = 0

    def begin_step(self, kind: str, tokens: list[int]) -> None:
        trace = self.trace
        if kind == "prompt":
            if len(tokens) != trace.prompt_tokens:
                raise ConfigError(f"a replayed prompt must have the trace's {trace.prompt_tokens} tokens, "
                                  f"this one has {len(tokens)}")
            self._index = 0
        else:
            if self._step is None:
                raise ConfigError("a replay starts with the trace's prompt; this decode step has none before it")
            if trace.decode_steps == 0:
                raise ConfigError("this routing trace has no decode steps to replay")
            self._index += 1
            if self._index > trace.decode_steps:  # wrap around to the first decode step
                self._index = 1
                self.wraps += 1
        self._step = trace.steps[self._index]

    def on_plan(self, plan: RoutingPlan, layers_ahead: list[int]) -> RoutingPlan:
        """Only the plan changes: the routing weights stay the router's on the device, so the
        weight of top-k position p scales whichever expert the trace puts at position p (the
        decoder finds it by plan.chosen.index, the prompt path by the same order). What the cache
        loads, what is prefetched and which expert graphs run are the trace's; the output values
        are no model's, which a benchmark that times does not mind."""
        step = self._step
        if step is None or len(step.tokens) != plan.tokens:
            raise ConfigError(f"layer {plan.layer} read back {plan.tokens} tokens outside the replayed step")
        trace_layer = self._trace_layer[plan.layer]
        chosen = [expert for per_token in step.experts[trace_layer] for expert in per_token]
        recorded = step.guesses[trace_layer]
        guesses = {later: recorded[d] for d, later in enumerate(layers_ahead[:len(recorded)])}
        return RoutingPlan(plan.layer, plan.tokens, chosen, guesses)


@dataclass(frozen=True)
class LayerLocality:
    layer: int
    reuse: float  # mean share of a token's experts that the previous token also chose
    random_reuse: float  # what independent uniform routing gives: top_k / experts
    independent_reuse: float  # what independent routing with this layer's expert shares gives
    lookahead_recall: list[float]  # per depth d: share of this layer's experts guessed d layers before
    expert_share: list[float]  # share of the layer's expert uses per expert (balance)


def locality(trace: RoutingTrace) -> list[LayerLocality]:
    """Per layer: temporal reuse over the token sequence (prompt tokens, then decode tokens) and
    the recall of the lookahead's guesses made for it during the decode steps (uniform guesses
    would recall width / experts)."""
    k, experts = trace.top_k, trace.experts
    result = []
    for layer in range(trace.moe_layers):
        sequence = [chosen for step in trace.steps for chosen in step.experts[layer]]
        pairs = list(zip(sequence, sequence[1:]))
        reuse = sum(len(set(a) & set(b)) for a, b in pairs) / (k * len(pairs)) if pairs else 0.0
        recall = []
        for depth in range(1, trace.lookahead_depth + 1):
            source = layer - depth
            hits = total = 0
            for step in trace.steps[1:]:
                if source >= 0 and len(step.guesses[source]) >= depth:
                    hits += len(set(step.guesses[source][depth - 1]) & set(step.experts[layer][0]))
                    total += k
            if total:
                recall.append(hits / total)
        counts = [0] * experts
        for chosen in sequence:
            for expert in chosen:
                counts[expert] += 1
        share = [count / max(1, sum(counts)) for count in counts]
        chance = [k * value for value in share]  # the chance that a token chooses each expert
        result.append(LayerLocality(layer, reuse, k / experts, sum(c * c for c in chance) / k, recall, share))
    return result


def render_locality(trace: RoutingTrace) -> str:
    """A table: reuse of the previous token's experts, against independent routing (uniform,
    and with the layer's own expert shares), the lookahead's recall, the busiest expert's share."""
    lines = [f"{'layer':>5} {'reuse':>6} {'unif.':>6} {'indep.':>6}  {'lookahead recall':<18} busiest expert"]
    for row in locality(trace):
        recall = " ".join(f"d{d + 1} {value:.2f}" for d, value in enumerate(row.lookahead_recall)) or "-"
        lines.append(f"{row.layer:>5} {row.reuse:>6.2f} {row.random_reuse:>6.2f} {row.independent_reuse:>6.2f}  "
                     f"{recall:<18} {max(row.expert_share):.2f}")
    return "\n".join(lines)
