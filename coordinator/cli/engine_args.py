"""Arguments that open an engine, shared by every command that generates (generate, serve, bench)."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, metavar="STORE", help="a store made by `pack` (or `make-synthetic`)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="compute dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--cache-experts", type=int, default=4, metavar="K",
                        help="GPU expert slots per layer (default 4; at most the experts per layer)")
    parser.add_argument("--no-prefetch", action="store_true", help="turn speculative expert loading off")
    parser.add_argument("--prefetch-depth", type=int, default=1, metavar="D", help="layers ahead to prefetch (default 1)")
    add_source_arguments(parser)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("ram", "disk"), default="ram",
                        help="where experts live on this machine: ram (read once, pinned) or disk (memory-mapped) (default ram)")


def source_from_args(args: argparse.Namespace):
    """The `source` argument of Engine.open: a name, or a factory for remote sources."""
    return args.source


def open_engine(args: argparse.Namespace, *, progress: bool = True):
    from coordinator.engine import Engine
    from common.store.manifest import Manifest
    from pathlib import Path

    experts = Manifest.read(Path(args.store)).model.num_experts
    return Engine.open(
        args.store,
        source=source_from_args(args),
        device=args.device,
        dtype=args.dtype,
        cache_experts=min(args.cache_experts, experts) if args.cache_experts >= 1 else args.cache_experts,
        prefetch=not args.no_prefetch,
        prefetch_depth=args.prefetch_depth,
        progress=progress,
    )
