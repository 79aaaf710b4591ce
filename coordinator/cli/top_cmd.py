"""top: a live terminal view of a running server's metrics."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser(
        "top",
        help="live view of a running server: tokens/s, expert hit rate, traffic per host, queue",
        description="Show a running `serve`'s /metrics as a live terminal view: tokens/s, time to first token, "
        "expert cache hit rate overall and per layer, bytes per source or expert host and its health, the queue.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's address (default http://127.0.0.1:8000)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (default 2)")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--api-key-file", metavar="FILE", help="the server's key, when it has one")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.errors import ConfigError
    from coordinator.server.api_key import read_api_key
    from coordinator.top.view import run_top

    if not args.interval > 0:
        raise ConfigError(f"--interval {args.interval}: must be more than 0")
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    run_top(url=args.url, interval_s=args.interval, once=args.once, api_key=api_key)
    return 0
