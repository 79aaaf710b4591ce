"""bench-fetch: gRPC fetch throughput of one expert host over loopback, against a raw socket copy."""

import argparse
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "bench-fetch",
        help="measure fetch throughput of one host over loopback against a raw socket copy",
        description="Start an expert host and a raw socket sender on 127.0.0.1, fetch experts through the "
        "coordinator's gRPC client (checksums verified) and through the raw socket, with one stream and with "
        "several in parallel, and print GB/s and the ratio to the raw copy. A benchmark, not a test.",
    )
    parser.add_argument("--store", required=True, metavar="STORE", help="the packed store (bigger experts measure better)")
    parser.add_argument("--streams", type=int, default=4, metavar="N", help="parallel streams of the second round (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0, metavar="S", help="seconds per measurement (default 3)")
    parser.add_argument("--chunk-bytes", type=int, default=0, metavar="B", help="chunk size to ask the host for (default: its default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.errors import ConfigError
    from common.store.manifest import Manifest

    from coordinator.bench.fetch import bench_fetch, report

    if args.streams < 1 or args.seconds <= 0:
        raise ConfigError("--streams must be at least 1 and --seconds positive")
    streams = [1] if args.streams == 1 else [1, args.streams]
    measurements = bench_fetch(store=args.store, streams=streams, seconds=args.seconds, chunk_bytes=args.chunk_bytes)
    print(report(measurements, blob_nbytes=Manifest.read(Path(args.store)).layout.nbytes, as_json=args.json))
    return 0
