"""Frames of `top`: throughput, the expert cache (overall and per layer), traffic per source or
host with its health, and the queue. Rates ("now") come from the difference between two scrapes;
the first frame (and `--once`) has only the totals and the last request's decode speed."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.errors import ServerError

from .snapshot import MetricsSnapshot, fetch_snapshot, hit_rate


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _rate(now: float, before: float | None, seconds: float | None) -> float | None:
    if before is None or not seconds:
        return None
    return max(0.0, now - before) / seconds


def render(current: MetricsSnapshot, previous: MetricsSnapshot | None = None, *, url: str = "") -> Group:
    seconds = current.taken_at - previous.taken_at if previous is not None else None
    tokens_now = _rate(current.tokens_generated, previous.tokens_generated if previous else None, seconds)

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("tokens/s now", "-" if tokens_now is None else f"{tokens_now:.1f}")
    summary.add_row("tokens/s (last request)", f"{current.last_decode_tokens_per_s:.1f}")
    summary.add_row("tokens generated", f"{current.tokens_generated:.0f}")
    ttft = current.mean_ttft_s
    summary.add_row("time to first token", "-" if ttft is None else f"{ttft * 1000:.0f} ms mean over {current.ttft_count:.0f}")
    summary.add_row("expert hit rate", f"{_percent(current.hit_rate)} ({current.hits:.0f} hits, {current.misses:.0f} misses)")
    prefetch = [sum(getattr(layer, name) for layer in current.layers) for name in ("prefetch_hits", "prefetch_issued", "prefetch_wasted")]
    summary.add_row("prefetch", f"{prefetch[0]:.0f} hits of {prefetch[1]:.0f} issued, {prefetch[2]:.0f} wasted")
    summary.add_row("waited on experts", f"{current.expert_wait_s:.2f} s")
    summary.add_row("queue", f"{'generating' if current.generating else 'idle'}, {current.queue_length:.0f} waiting")
    outcomes = ", ".join(f"{name} {count:.0f}" for name, count in sorted(current.requests.items())) or "none yet"
    summary.add_row("requests", outcomes)

    layers = Table(title="expert cache per layer", title_justify="left")
    for header in ("layer", "hits", "misses", "hit rate", "prefetch hits", "issued", "wasted", "loaded"):
        layers.add_column(header, justify="right")
    for index, layer in enumerate(current.layers):
        layers.add_row(str(index), f"{layer.hits:.0f}", f"{layer.misses:.0f}", _percent(hit_rate(layer.hits, layer.misses)),
                       f"{layer.prefetch_hits:.0f}", f"{layer.prefetch_issued:.0f}", f"{layer.prefetch_wasted:.0f}",
                       human_bytes(layer.bytes_fetched))

    sources = Table(title="expert traffic per source / host", title_justify="left")
    for header, justify in (("source", "left"), ("bytes", "right"), ("now", "right"), ("health", "left")):
        sources.add_column(header, justify=justify)
    for name in sorted(set(current.source_bytes) | set(current.hosts_up)):
        total = current.source_bytes.get(name, 0.0)
        rate = _rate(total, previous.source_bytes.get(name, 0.0) if previous else None, seconds)
        health = "-" if name not in current.hosts_up else ("[green]up[/]" if current.hosts_up[name] else "[red]DOWN[/]")
        sources.add_row(name, human_bytes(total), "-" if rate is None else f"{human_bytes(rate)}/s", health)

    title = Text.assemble(("moe-edge top", "bold"), f"  {current.model}  {url}")
    return Group(title, summary, layers, sources)


def run_top(*, url: str, interval_s: float = 2.0, once: bool = False, api_key: str | None = None,
            console: Console | None = None) -> None:
    """Draw frames until Ctrl-C (or one frame with once=True). A scrape that fails ends `once`
    with a ServerError; the live view shows the error and keeps trying, unless the server refused
    (wrong key, not our server)."""
    console = console or Console()
    if once:
        console.print(render(fetch_snapshot(url, api_key=api_key), url=url))
        return
    previous: MetricsSnapshot | None = None
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                try:
                    current = fetch_snapshot(url, api_key=api_key)
                    live.update(render(current, previous, url=url), refresh=True)
                    previous = current
                except ServerError as err:
                    if err.status in (401, 403, 404):  # waiting will not fix these
                        raise
                    live.update(Text(f"moe-edge top: {err} (retrying every {interval_s:g} s)", style="red"), refresh=True)
                time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
