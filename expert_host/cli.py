"""`python -m expert_host COMMAND`: thin entry points. Each command adds its arguments and calls
one typed function; errors of ours become one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _add_serve(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="hold a shard of a store's experts and serve them over gRPC",
        description="Hold some or all experts of a packed store in RAM (or read them from the store's files per fetch) and stream them to "
        "coordinators over gRPC (ExpertHost service, plus grpc.health.v1). Stops gracefully on SIGTERM/SIGINT.",
    )
    parser.add_argument("--store", required=True, metavar="STORE", help="the packed store folder (the same store as the coordinator's)")
    parser.add_argument("--layers", default=None, metavar="SPEC", help="layers to hold, e.g. 0-15 or 0,2,5-7 (default: all)")
    parser.add_argument("--experts", default=None, metavar="SPEC", help="experts of each held layer to hold, e.g. 0-3 (default: all)")
    parser.add_argument("--listen", default="127.0.0.1:50051", metavar="ADDR",
                        help="HOST:PORT or unix:PATH to listen on (default 127.0.0.1:50051; port 0: any free port)")
    parser.add_argument("--mmap", action="store_true",
                        help="serve the blobs by reading them from the store's files at each fetch (the page cache / SSD tier) instead of holding them in RAM")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="this host's certificate (with --tls-key: serve TLS)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                        help="CA certificate that client certificates must be signed by (mutual TLS)")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="file holding the shared token that every call must carry (authorization: Bearer TOKEN)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --listen address without TLS or a token (trusted networks only)")
    parser.add_argument("--address-file", type=Path, metavar="FILE",
                        help="once serving, write the bound address (with the real port when --listen ends in :0) to FILE")
    parser.add_argument("--grace-period", type=float, default=5.0, metavar="S",
                        help="on SIGTERM/SIGINT, seconds to let calls in flight finish (default 5)")
    parser.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                        help="PID of the process that starts this host: stop when it exits (the coordinator's --local-host uses it)")
    parser.add_argument("--shared-memory", type=Path, default=None, metavar="FILE",
                        help="hold the shard in FILE, made new with mode 0600 (under /dev/shm: RAM), so that a "
                        "coordinator on this machine maps it instead of fetching over gRPC (--local-host does); "
                        "removed when the host stops")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads that run experts (default: every core); fewer when the host shares its "
                        "machine with a coordinator, so that the two do not stall each other")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                        help="what to log on stderr: info logs each client and every refused call (default info)")
    # Test hooks (fault injection), hidden from --help: only the tests use them.
    parser.add_argument("--test-fetch-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--test-corrupt-chunks", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--test-load-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--test-run-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from common.errors import ConfigError

    from .fault_injection import FaultInjection
    from .server import TlsFiles, serve_expert_host

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both, or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert is not None else None
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give at least 1")
        import torch

        torch.set_num_threads(args.threads)  # the experts' kernels run on torch's thread count
    serve_expert_host(
        store=args.store,
        layers=args.layers,
        experts=args.experts,
        listen=args.listen,
        mmap=args.mmap,
        tls=tls,
        token_file=args.token_file,
        insecure=args.insecure,
        address_file=args.address_file,
        grace_period_s=args.grace_period,
        parent_pid=args.parent_pid,
        shared_file=args.shared_memory,
        faults=FaultInjection(fetch_delay_s=args.test_fetch_delay, corrupt_chunks=args.test_corrupt_chunks,
                              load_delay_s=args.test_load_delay, run_delay_s=args.test_run_delay),
    )
    return 0


def _add_link_proxy(commands) -> None:
    parser = commands.add_parser(
        "link-proxy",
        help="a TCP proxy with a bandwidth and a round-trip time, to try a LAN link on one machine",
        description="Relay TCP connections from --listen to --to as if over a slower link: each direction sends at "
        "--rate and delivers half of --rtt-ms later, holding about a bandwidth-delay product in flight. For tests "
        "and benchmarks (e.g. a coordinator reaching an expert host as over 1 GbE); listens on loopback only.",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                        help="where to listen (default 127.0.0.1:0: a free port, printed at start)")
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="the address to relay to (an expert host)")
    parser.add_argument("--rate", default="1gbit", metavar="RATE",
                        help="bandwidth of each direction, e.g. 1gbit, 2.5gbit, 10gbit, 100mbit (default 1gbit)")
    parser.add_argument("--rtt-ms", type=float, default=0.3, metavar="MS", help="round-trip time in ms (default 0.3)")
    parser.set_defaults(run=_run_link_proxy)


def _run_link_proxy(args: argparse.Namespace) -> int:
    from .link_proxy import run_link_proxy

    run_link_proxy(listen=args.listen, to=args.to, rate=args.rate, rtt_ms=args.rtt_ms)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m expert_host",
        description="moe-edge expert host: serve a shard of a packed store's experts to coordinators over gRPC.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(commands)
    _add_link_proxy(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.cli_errors import run_command

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s expert_host %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return run_command(args)
