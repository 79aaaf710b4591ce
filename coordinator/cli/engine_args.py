"""Arguments that open an engine, shared by every command that runs one (generate, serve, bench):
they become one EngineOptions (coordinator/runtime/engine_options.py), which holds the defaults
and the checks.

`source_from_args` is the one place that turns arguments into an expert source: an in-process
source's name, or a factory for an ExpertPool of expert hosts (--hosts, --cluster, --local-host)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def _default(name: str):
    from coordinator.runtime.engine_options import EngineOptions

    return EngineOptions.__dataclass_fields__[name].default


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The options of EngineOptions that every engine command takes (generate, serve, bench),
    with EngineOptions' defaults; the checks happen when EngineOptions is built."""
    from coordinator.runtime.engine_options import DTYPE_NAMES

    parser.add_argument("--store", required=True, metavar="STORE", help="a store made by `pack` (or `make-synthetic`)")
    parser.add_argument("--device", default=_default("device"), help=f"cpu or cuda (default {_default('device')})")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="compute dtype (default float32 on cpu, bfloat16 on cuda)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-experts", type=int, default=_default("cache_experts"), metavar="K",
                        help=f"GPU expert slots per layer (default {_default('cache_experts')}; at most the experts per layer)")
    budget.add_argument("--gpu-budget-gb", type=float, metavar="G",
                        help="derive the slots per layer from a GPU memory budget in GB instead of --cache-experts")
    parser.add_argument("--prefetch-depth", type=int, default=_default("prefetch_depth"), metavar="D",
                        help="layers ahead to prefetch (default 1; 2 with --placement auto)")
    from coordinator.runtime.engine_options import PLACEMENTS

    parser.add_argument("--placement", choices=PLACEMENTS, default=_default("placement"),
                        help="per expert that is not on the GPU: copy it into the cache, run it where it lives (this "
                        "machine's CPU), or auto: whichever finishes first by measured costs (default "
                        f"{_default('placement')})")
    parser.add_argument("--prompt-chunk", type=int, default=_default("prompt_chunk"), metavar="N",
                        help=f"prompt tokens per pass of the prompt path; bounds its GPU memory (default {_default('prompt_chunk')})")
    parser.add_argument("--no-cuda-graphs", "--eager", dest="cuda_graphs", action="store_false",
                        help="decode without capturing CUDA graphs (the same steps, run directly; to compare)")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything that opens an engine for generating (generate, serve): engine options, prefetch
    on/off and where the experts come from."""
    add_engine_options(parser)
    parser.add_argument("--no-prefetch", action="store_true", help="turn speculative expert loading off")
    add_source_arguments(parser)


def engine_options_from_args(args: argparse.Namespace, *, source: str = "ram", progress: bool = False):
    """The EngineOptions the arguments describe (checked as it is made)."""
    from coordinator.runtime.engine_options import EngineOptions

    return EngineOptions(
        device=args.device,
        dtype=args.dtype,
        cache_experts=args.cache_experts,
        gpu_budget_gb=args.gpu_budget_gb,
        prefetch=not getattr(args, "no_prefetch", False),
        prefetch_depth=args.prefetch_depth,
        source=source,
        cuda_graphs=args.cuda_graphs,
        placement=args.placement,
        prompt_chunk=args.prompt_chunk,
        progress=progress,
    )


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("ram", "disk"), default=None,
                        help="where experts live when no expert hosts are used: ram (read once, pinned) or disk "
                        "(read per fetch from the store's files, the page cache / SSD tier) (default ram)")
    hosts = parser.add_argument_group(
        "expert hosts", "fetch the experts from expert hosts (`python -m expert_host serve`) instead of this process's memory"
    )
    which = hosts.add_mutually_exclusive_group()
    which.add_argument("--hosts", metavar="ADDR[,ADDR...]",
                       help="expert hosts to use, as HOST:PORT or unix:PATH, comma-separated")
    which.add_argument("--cluster", type=Path, metavar="TOML",
                       help="a cluster.toml listing the hosts, token file and TLS files (see deploy/cluster.toml)")
    hosts.add_argument("--local-host", action="store_true",
                       help="start an expert host holding the whole store beside this process (on a private Unix "
                       "socket) and stop it on exit")
    hosts.add_argument("--token-file", type=Path, metavar="FILE",
                       help="file holding the hosts' shared token (overrides token_file of --cluster)")
    hosts.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="CA certificate that signed the hosts' certificates: talk TLS to HOST:PORT hosts "
                       "(with --tls-cert/--tls-key: replaces [tls] of --cluster)")
    hosts.add_argument("--tls-cert", type=Path, metavar="PEM", help="this coordinator's certificate, for hosts that ask for mutual TLS")
    hosts.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    hosts.add_argument("--fetch-deadline", type=float, default=None, metavar="S",
                       help="seconds one fetch from one host may take before the next replica is tried (default 30)")
    hosts.add_argument("--host-restart-wait", type=float, default=None, metavar="S",
                       help="when every host holding an expert is down, seconds to wait for one to restart and "
                       "finish loading before the generation fails (default 60; 0: fail at once)")
    hosts.add_argument("--run-experts", choices=("stream", "unary"), default=None,
                       help="how experts run on the hosts (--placement run/auto) are sent: stream, one long-lived "
                       "RunExpertsStream per host (the shorter round trip), or unary, one RunExperts call per layer "
                       "and host (overrides run_experts of --cluster; default stream)")


def source_from_args(args: argparse.Namespace, *, local_host=None):
    """The `source` argument of Engine.open: a name, or a factory for remote sources.
    `local_host`: the HostAddress of a host started by --local-host, to add to the pool."""
    from common.errors import ConfigError

    client_options = [name for name in ("token_file", "tls_ca", "tls_cert", "tls_key", "fetch_deadline",
                                            "host_restart_wait", "run_experts")
                      if getattr(args, name) is not None]
    if not (args.hosts or args.cluster or local_host is not None):
        if client_options:
            raise ConfigError(f"--{client_options[0].replace('_', '-')} applies to expert hosts: add --hosts, --cluster or --local-host")
        return args.source or "ram"
    if args.source is not None:
        raise ConfigError(f"--source {args.source}: the experts come from expert hosts here; leave --source out")
    from coordinator.sources.expert_pool import ExpertPool

    return ExpertPool.source_factory(_cluster_from_args(args, local_host))


def _cluster_from_args(args: argparse.Namespace, local_host):
    """--cluster's TOML (or --hosts), then the command line's token and TLS options over it."""
    from common.errors import ConfigError
    from coordinator.sources.cluster_config import ClientTls, ClusterConfig, parse_host_list, read_cluster_config

    if args.cluster is not None:
        cluster = read_cluster_config(args.cluster)
    else:
        cluster = ClusterConfig(hosts=parse_host_list(args.hosts) if args.hosts else ())
    if args.token_file is not None:
        cluster = replace(cluster, token_file=args.token_file)
    if args.tls_ca is not None or args.tls_cert is not None or args.tls_key is not None:
        if args.tls_ca is None:
            raise ConfigError("--tls-cert/--tls-key need --tls-ca (the CA that signed the hosts' certificates)")
        cluster = replace(cluster, tls=ClientTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key))
    if args.fetch_deadline is not None:
        cluster = replace(cluster, pool=replace(cluster.pool, fetch_deadline_s=args.fetch_deadline))
    if args.host_restart_wait is not None:
        cluster = replace(cluster, pool=replace(cluster.pool, host_restart_wait_s=args.host_restart_wait))
    if args.run_experts is not None:
        cluster = replace(cluster, pool=replace(cluster.pool, run_experts=args.run_experts))
    return cluster.with_hosts([local_host]) if local_host is not None else cluster


def open_engine(args: argparse.Namespace, *, progress: bool = True):
    from coordinator.runtime.engine import Engine
    from coordinator.sources.local_host import LocalHost

    local_host = LocalHost(args.store) if args.local_host else None
    try:
        source = source_from_args(args, local_host=local_host.address if local_host else None)  # checks the arguments
        options = engine_options_from_args(args, source=source if isinstance(source, str) else "custom", progress=progress)
        if local_host is not None:
            local_host.start()
            source = local_host.source_over(source, pin=options.device != "cpu")  # its experts in shared memory
        engine = Engine.from_options(args.store, options, None if isinstance(source, str) else source)
    except BaseException:
        if local_host is not None:
            local_host.stop()
        raise
    if local_host is not None:
        engine.add_closer(local_host.stop)
    return engine
