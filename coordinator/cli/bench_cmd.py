"""bench: decode speed of naive / LRU / LRU+prefetch / all-resident, and of the placements of misses, in one run."""

import argparse
import json
import sys

from .engine_args import add_engine_options, add_source_arguments, engine_options_from_args, open_engine

MODES = "naive,lru,lru+prefetch,resident"  # coordinator.runtime.engine.CACHE_MODES, without importing torch


def register(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="benchmark decode: naive, LRU, LRU+prefetch and all-resident, in one report",
        description="Measure decode speed of the offloading modes on one store in one process: tokens/s, hit rate, "
        "prefetch recall/precision, bytes copied per token, link GB/s, copy-stream busy share, peak GPU memory, "
        "host RAM, and a per-token time breakdown; prints the copy bound from the pinned peak measured on the spot.",
    )
    add_engine_options(parser)
    add_source_arguments(parser)
    parser.add_argument("--tokens", type=int, default=32, metavar="N", help="timed decode tokens (default 32)")
    parser.add_argument("--prompt-tokens", type=int, default=16, metavar="P", help="prompt length for prefill (default 16)")
    parser.add_argument("--warmup-tokens", type=int, default=4, help="untimed decode tokens first (default 4)")
    parser.add_argument("--profile-tokens", type=int, default=8, help="tokens of the instrumented breakdown pass (default 8)")
    parser.add_argument("--modes", default=MODES, help=f"comma-separated subset of {MODES}")
    parser.add_argument("--placements", default=None, metavar="LIST",
                        help="comma-separated placements to run side by side, of copy,run,auto (default: --placement); "
                        "lru and lru+prefetch run once per placement, naive and resident only with copy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt and token stream (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--routing", metavar="FILE",
                        help="replay a routing trace (from `generate --record-routing`) instead of the store's routers: "
                        "its experts per layer and its lookahead guesses; the prompt takes the trace's length "
                        "(--prompt-tokens is not used), decode steps wrap around past its end")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.bench.decode import run_bench
    from coordinator.bench.report import render

    progress = sys.stderr.isatty()
    placements = tuple(p.strip() for p in (args.placements or args.placement).split(",") if p.strip())
    report = run_bench(
        store=args.store, options=engine_options_from_args(args, source=args.source or "ram", progress=progress),
        tokens=args.tokens, prompt_tokens=args.prompt_tokens, warmup_tokens=args.warmup_tokens,
        profile_tokens=args.profile_tokens, modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        placements=placements, seed=args.seed, routing=args.routing,
        open_engine=lambda: open_engine(args, progress=progress),  # the experts' source: RAM, disk or expert hosts
    )
    print(json.dumps(report.to_dict(), indent=1) if args.json else render(report))
    return 0
