"""The benchmark's table for people (the JSON is BenchReport.to_dict())."""

from __future__ import annotations

from .decode import BenchReport
from ..runtime.phase_clock import PHASES


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render(report: BenchReport) -> str:
    lines = [
        f"moe-edge bench: {report.store} on {report.device} ({report.dtype}, "
        f"{'CUDA graphs' if report.cuda_graphs else 'eager'} decode)",
        f"  {report.layers} layers with experts x {report.experts} experts, {report.expert_bits}-bit experts (group {report.group_size}, "
        f"{report.expert_mb:.1f} MB each), K = {report.cache_experts} slots per layer; prompt {report.prompt_tokens} tokens, "
        f"{report.tokens} decode tokens (seeded random token stream)",
        f"  routing comes from {report.routing}",
        f"  pinned host->device copy peak, measured now: {report.pinned_peak_gbps:.1f} GB/s",
        "",
        f"{'mode':<13} {'decode':>8} {'prefill':>8} {'hit':>5} {'pf':>5} {'pf':>5} {'experts':>8} {'GB':>6} {'link':>6} {'copy':>5} {'peak':>6} {'host':>6}",
        f"{'':<13} {'tok/s':>8} {'tok/s':>8} {'rate':>5} {'rec.':>5} {'prec':>5} {'/token':>8} {'/token':>6} {'GB/s':>6} {'busy':>5} {'GPU GB':>6} {'RSS GB':>6}",
    ]
    for r in report.results:
        if r.skipped:
            lines.append(f"{r.mode:<13} skipped: {r.skipped}")
            continue
        lines.append(
            f"{r.mode:<13} {r.decode_tokens_per_s:>8.2f} {r.prefill_tokens_per_s:>8.1f} {_pct(r.hit_rate):>5} "
            f"{_pct(r.prefetch_recall):>5} {_pct(r.prefetch_precision):>5} {r.experts_copied_per_token:>8.1f} "
            f"{r.bytes_copied_per_token / 1e9:>6.2f} {r.link_gbps:>6.1f} {_pct(r.copy_busy_share):>5} "
            f"{r.peak_gpu_gb:>6.2f} {r.host_rss_gb:>6.1f}"
        )
    lines.append("")
    lines.append("per-token breakdown, ms (a separate pass that synchronizes at each phase):")
    lines.append(f"{'mode':<13} " + " ".join(f"{p:>18}" for p in PHASES))
    for r in report.results:
        if not r.skipped:
            lines.append(f"{r.mode:<13} " + " ".join(f"{r.breakdown_ms_per_token.get(p, 0):>18.2f}" for p in PHASES))
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
    return "\n".join(lines)
