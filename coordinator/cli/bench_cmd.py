"""bench: decode speed of naive / LRU / LRU+prefetch / all-resident in one run."""

import argparse
import json
import sys


def register(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="benchmark decode: naive, LRU, LRU+prefetch and all-resident, in one report",
        description="Measure decode speed of the offloading modes on one store in one process: tokens/s, hit rate, "
        "prefetch recall/precision, bytes copied per token, link GB/s, copy-stream busy share, peak GPU memory, "
        "host RAM, and a per-token time breakdown; prints the copy bound from the pinned peak measured on the spot.",
    )
    parser.add_argument("--store", required=True, metavar="STORE", help="a store (e.g. from make-synthetic)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="compute dtype (default bfloat16 on cuda, float32 on cpu)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-experts", type=int, metavar="K", help="expert slots per layer (default 4)")
    budget.add_argument("--gpu-budget-gb", type=float, metavar="G", help="derive K from a GPU memory budget in GB")
    parser.add_argument("--tokens", type=int, default=32, metavar="N", help="timed decode tokens (default 32)")
    parser.add_argument("--prompt-tokens", type=int, default=16, metavar="P", help="prompt length for prefill (default 16)")
    parser.add_argument("--warmup-tokens", type=int, default=4, help="untimed decode tokens first (default 4)")
    parser.add_argument("--profile-tokens", type=int, default=8, help="tokens of the instrumented breakdown pass (default 8)")
    parser.add_argument("--prefetch-depth", type=int, default=1, metavar="D", help="layers ahead (default 1)")
    parser.add_argument("--modes", default="naive,lru,lru+prefetch,resident",
                        help="comma-separated subset of naive,lru,lru+prefetch,resident")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt and token stream (default 0)")
    parser.add_argument("--eager", action="store_true", help="decode without CUDA graphs (to compare)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.bench.decode import run_bench
    from coordinator.bench.report import render

    report = run_bench(
        store=args.store, device=args.device, dtype=args.dtype, cache_experts=args.cache_experts,
        gpu_budget_gb=args.gpu_budget_gb, tokens=args.tokens, prompt_tokens=args.prompt_tokens,
        warmup_tokens=args.warmup_tokens, profile_tokens=args.profile_tokens, prefetch_depth=args.prefetch_depth,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), seed=args.seed, cuda_graphs=not args.eager,
        progress=sys.stderr.isatty(),
    )
    print(json.dumps(report.to_dict(), indent=1) if args.json else render(report))
    return 0
