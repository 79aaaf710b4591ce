"""The benchmark's table for people (the JSON is BenchReport.to_dict())."""

from __future__ import annotations

from .decode import BenchReport
from ..runtime.phase_clock import PHASES


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _links(report: BenchReport, r) -> str:
    """Bytes per token over each link, both directions for a host."""
    parts = []
    for origin, link in r.bytes_per_token_by_link.items():
        if "run_sent" not in link:  # only copies came from there: ram, disk, shared memory, a host copy only
            parts.append(f"{origin}->device {_size(link['fetched'])}")
        else:
            parts.append(f"{origin}: to us {_size(link['fetched'] + link.get('run_received', 0))} "
                         f"(copies {_size(link['fetched'])}, run sums {_size(link.get('run_received', 0))}), "
                         f"to it {_size(link.get('run_sent', 0))}")
    return "; ".join(parts) or "-"


def render(report: BenchReport) -> str:
    lines = [
        f"moe-edge bench: {report.store} on {report.device} ({report.dtype}, "
        f"{'CUDA graphs' if report.cuda_graphs else 'eager'} decode)",
        f"  {report.layers} layers with experts x {report.experts} experts, {report.expert_bits}-bit experts (group {report.group_size}, "
        f"{report.expert_mb:.1f} MB each), K = {report.cache_experts} slots per layer; prompt {report.prompt_tokens} tokens, "
        f"{report.tokens} decode tokens (seeded random token stream)",
        f"  routing: {report.routing}",
        f"  pinned host->device copy peak, measured now: {report.pinned_peak_gbps:.1f} GB/s",
        f"  experts from {report.source}; run/auto run a miss on "
        + ("this machine's CPU" if report.runs_elsewhere_on == "cpu" else "the expert host that holds it")
        + ("" if report.prepare_runs_s is None else
           f" (every expert repacked for that before timing: {report.prepare_runs_s:.1f} s)"),
        *([f"  {report.host_load.describe()}"] if report.host_load is not None else []),
        "",
        f"{'mode':<18} {'decode':>8} {'prefill':>8} {'hit':>5} {'pf':>5} {'pf':>5} {'experts':>8} {'GB':>6} {'link':>6} {'copy':>5} {'peak':>6} {'host':>6}",
        f"{'':<18} {'tok/s':>8} {'tok/s':>8} {'rate':>5} {'rec.':>5} {'prec':>5} {'/token':>8} {'/token':>6} {'GB/s':>6} {'busy':>5} {'GPU GB':>6} {'RSS GB':>6}",
    ]
    for r in report.results:
        if r.skipped:
            lines.append(f"{r.label:<18} skipped: {r.skipped}")
            continue
        lines.append(
            f"{r.label:<18} {r.decode_tokens_per_s:>8.2f} {r.prefill_tokens_per_s:>8.1f} {_pct(r.hit_rate):>5} "
            f"{_pct(r.prefetch_recall):>5} {_pct(r.prefetch_precision):>5} {r.experts_copied_per_token:>8.1f} "
            f"{r.bytes_copied_per_token / 1e9:>6.2f} {r.link_gbps:>6.1f} {_pct(r.copy_busy_share):>5} "
            f"{r.peak_gpu_gb:>6.2f} {r.host_rss_gb:>6.1f}"
        )
    lines.append("")
    lines.append("per-token breakdown, ms (a separate pass that synchronizes at each phase):")
    lines.append(f"{'mode':<18} " + " ".join(f"{p:>18}" for p in PHASES))
    for r in report.results:
        if not r.skipped:
            lines.append(f"{r.label:<18} " + " ".join(f"{r.breakdown_ms_per_token.get(p, 0):>18.2f}" for p in PHASES))
    where = "on CPU" if report.runs_elsewhere_on == "cpu" else "on host"
    lines.append("")
    lines.append("expert uses per token by where they ran, and the token loop's waits per token:")
    lines.append(f"{'mode':<18} {'device':>7} {'copied':>7} {'run':>7} {'guesses':>7} {'copy':>8} {'run':>8} {'host':>8} {'host':>8}  bytes per token over each link")
    lines.append(f"{'':<18} {'hit':>7} {'in':>7} {where:>7} {'left':>7} {'wait ms':>8} {'wait ms':>8} {'call ms':>8} {'cpu ms':>8}")
    for r in report.results:
        if not r.skipped:
            lines.append(f"{r.label:<18} {r.hits_per_token:>7.1f} {r.misses_per_token:>7.1f} {r.runs_elsewhere_per_token:>7.1f} "
                         f"{r.prefetch_left_per_token:>7.1f} "
                         f"{r.copy_wait_ms_per_token:>8.1f} {r.run_wait_ms_per_token:>8.1f} {r.host_run_ms_per_token:>8.1f} {r.host_compute_ms_per_token:>8.1f}  "
                         f"{_links(report, r)}")
    full, naive = report.result("lru+prefetch"), report.result("naive")
    bound = report.copy_bound("lru+prefetch")
    if full is not None and bound is not None:
        lines.append("")
        lines.append(
            f"copy bound of lru+prefetch: {bound:.2f} tok/s ({full.experts_copied_per_token:.1f} experts copied per token x "
            f"{report.expert_mb:.1f} MB / {report.pinned_peak_gbps:.1f} GB/s); achieved {full.decode_tokens_per_s:.2f} tok/s "
            f"= {full.decode_tokens_per_s / bound:.2f} of the bound"
        )
    if full is not None and naive is not None:
        lines.append(f"lru+prefetch / naive: {full.decode_tokens_per_s / naive.decode_tokens_per_s:.2f}x")
    for placement in ("run", "auto"):
        placed = report.result("lru+prefetch", placement)
        if full is not None and placed is not None:
            lines.append(f"lru+prefetch/{placement} / lru+prefetch (copy): "
                         f"{placed.decode_tokens_per_s / full.decode_tokens_per_s:.2f}x")
    return "\n".join(lines)
