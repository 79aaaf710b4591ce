"""The per-layer round trip of RunExperts as the coordinator makes it (HostClient.run_experts):
unary calls against requests on the long-lived RunExpertsStream, on TCP loopback and a Unix
socket, taking turns call by call.

The server is the real ExpertHostServicer over a shard of STORE in RAM, in this process (as the
first measurement, which used a prototype stream, was), or with --host-process a real
`python -m expert_host serve` per transport (client and host then do not share an event loop).
One call = one layer: `--experts` experts of the store's first layer with experts on one
bfloat16 token. Prints, for each transport and kind, the median round trip and (host in this
process) the median round trip minus the host's own compute time (what the transport costs),
and with --json writes them to a file.

    PYTHONPATH=. python scripts/run_experts_round_trip.py --store STORE [--calls 400] [--experts 2]
        [--threads 1] [--host-process] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from common.host_address import HostAddress
from common.rpc.wire_limits import server_options
from common.store.reader import ExpertStore
from coordinator.sources.host_client import ClientCredentials, HostClient
from expert_host.expert_runner import ExpertRunner
from expert_host.servicer import ExpertHostServicer, add_to_server
from expert_host.shard import ExpertShard


class TimedRunner(ExpertRunner):
    """The host's runner, keeping the compute time of its last call (what RunExpertsReply's
    compute_s says, which HostClient does not hand back)."""

    last_compute_s = 0.0

    async def run(self, plan):
        output, seconds = await super().run(plan)
        self.last_compute_s = seconds
        return output, seconds


async def measure(store_path: str, calls: int, experts: int, host_process: bool) -> list[dict]:
    store = ExpertStore(store_path)
    hidden_size = store.config.hidden_size
    layer = min(store.manifest.experts).layer
    hidden = torch.randn(1, hidden_size).to(torch.bfloat16)  # [1, H]
    weights = torch.ones(1, experts)  # [1, n]
    where = "a host process per transport" if host_process else "the host in this process"
    print(f"{store_path}: hidden {hidden_size}, {experts} experts per call, {calls} calls each (the first quarter not "
          f"counted), {where}")
    folder = Path(tempfile.mkdtemp(prefix="rtt-"))
    results = []
    try:
        for name, listen in (("tcp loopback", "127.0.0.1:0"), ("unix socket", f"unix:{folder / 'host.sock'}")):
            async with serving(store, listen, folder, host_process) as (address, runner):
                results += await compare(name, address, runner, calls, lambda client: client.run_experts(
                    layer, list(range(experts)), hidden, weights, timeout_s=30))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


@contextlib.asynccontextmanager
async def serving(store: ExpertStore, listen: str, folder: Path, host_process: bool):
    """An expert host of the whole store on `listen`: its address and, in this process, its
    TimedRunner (None for a host process, whose compute time we do not see)."""
    if host_process:
        address_file = folder / "address"
        process, address = await asyncio.to_thread(start_host, [
            sys.executable, "-m", "expert_host", "serve", "--store", str(store.folder), "--listen", listen,
            "--address-file", str(address_file), "--log-level", "warning"], address_file)
        try:
            yield address, None
        finally:
            process.terminate()
            process.wait(30)
        return
    shard = ExpertShard(store, sorted(store.manifest.experts), progress=False)
    runner = TimedRunner(shard)
    servicer = ExpertHostServicer()
    servicer.serve_shard(shard, runner, memory_gbps=0.0, expert_ms=0.0)
    server = grpc.aio.server(options=server_options())
    add_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    await server.start()
    try:
        yield (listen if listen.startswith("unix:") else f"127.0.0.1:{port}"), runner
    finally:
        await server.stop(0)
        runner.close()


def start_host(argv: list[str], address_file: Path, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start an expert host process (`argv`: its command line, which writes `address_file` once
    it serves) and wait up to `timeout_s` for its address: the process and the address."""
    address_file.unlink(missing_ok=True)
    process = subprocess.Popen(argv)
    deadline = time.monotonic() + timeout_s
    while not address_file.exists():
        if process.poll() is not None:
            raise SystemExit(f"the expert host exited with {process.returncode}")
        if time.monotonic() > deadline:
            process.terminate()
            process.wait(30)
            raise SystemExit(f"the expert host did not serve within {timeout_s:g} s")
        time.sleep(0.05)
    return process, address_file.read_text().strip()


async def compare(name: str, address: str, runner, calls: int, one_call) -> list[dict]:
    """Unary calls and stream requests, taking turns call by call (which goes first alternates),
    so that a drift of the machine's load (it may be shared) weighs on both alike."""
    clients = {kind: HostClient(HostAddress.parse(address), ClientCredentials(), stream_runs=kind == "stream")
               for kind in ("unary", "stream")}
    samples = {kind: [] for kind in clients}
    try:
        for call in range(calls):
            for kind in (("unary", "stream") if call % 2 == 0 else ("stream", "unary")):
                started = time.perf_counter()
                await one_call(clients[kind])
                samples[kind].append((time.perf_counter() - started, runner.last_compute_s if runner else None))
    finally:
        for client in clients.values():
            await client.close()
    return [report(name, kind, samples[kind][calls // 4:]) for kind in clients]


def report(name: str, kind: str, samples: list[tuple[float, float | None]]) -> dict:
    trips = sorted(t for t, _ in samples)
    result = dict(transport=name, kind=kind, calls=len(samples), round_trip_ms=statistics.median(trips) * 1e3,
                  round_trip_p10_ms=trips[len(trips) // 10] * 1e3)
    line = (f"{name:>12} {kind:>6}: round trip median {result['round_trip_ms']:.3f} ms "
            f"(p10 {result['round_trip_p10_ms']:.3f})")
    if samples[0][1] is not None:
        overhead = sorted(t - c for t, c in samples)
        result.update(transport_ms=statistics.median(overhead) * 1e3, transport_p10_ms=overhead[len(overhead) // 10] * 1e3)
        line += (f"; minus the host's compute: median {result['transport_ms']:.3f} ms "
                 f"(p10 {result['transport_p10_ms']:.3f})")
    print(line)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the host's compute (default 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the medians to OUT")
    parser.add_argument("--host-process", action="store_true",
                        help="time a host started as its own process (`python -m expert_host serve`, its default "
                        "threads) instead of one in this process; the host's compute time is then not subtracted")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = asyncio.run(measure(args.store, args.calls, args.experts, args.host_process))
    if args.json is not None:
        args.json.write_text(json.dumps(dict(store=args.store, experts=args.experts, host_process=args.host_process,
                                             results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
