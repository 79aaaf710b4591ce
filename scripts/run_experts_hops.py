"""Where a RunExperts round trip's time goes, hop by hop: one host process, one client, as the
decode makes the call (the token loop's thread handing it to the fetch loop: FetchLoop.submit)
against the same call made on the fetch loop itself, and against grpcio's blocking stream and
blocking unary call; with
the host computing for real, handing a zero sum back from its worker thread (the hand-off, no
compute), or answering a zero sum at once on its event loop (neither).

    PYTHONPATH=. python scripts/run_experts_hops.py --store STORE [--calls 400] [--experts 2]
        [--stubs compute,worker-hop,none]

One call = `--experts` experts of the store's first layer with experts on one bfloat16 token,
repeated (the same experts: they stay in the CPU's caches, which a decode's do not). Prints the
median and p10 round trip of each (the first quarter of calls not counted). The host is started
by this file itself with `--host STUB` (it stubs ExpertRunner in that process, then runs
`expert_host serve`)."""

from __future__ import annotations

import argparse
import queue
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.run_experts_round_trip import start_host

STUBS = ("compute", "worker-hop", "none")  # what the host does for a call: see the docstring


def stub_host(stub: str, serve_args: list[str]) -> int:
    """Run `expert_host serve` with ExpertRunner stubbed as `stub` says."""
    import torch

    import expert_host.expert_runner as runner_module
    from expert_host.cli import main

    def zeros(plan):
        return torch.zeros(plan.hidden.shape[0], plan.hidden.shape[1]), 0.0

    if stub == "worker-hop":
        runner_module.ExpertRunner._compute = lambda self, plan, blobs: zeros(plan)
    elif stub == "none":
        async def run(self, plan):
            return zeros(plan)
        runner_module.ExpertRunner.run = run
    return main(["serve", *serve_args])


def summary(seconds: list[float]) -> str:
    kept = sorted(seconds[len(seconds) // 4:])
    return f"median {statistics.median(kept) * 1e3:.3f} ms, p10 {kept[len(kept) // 10] * 1e3:.3f} ms"


def timed(calls: int, one) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        one()
        samples.append(time.perf_counter() - started)
    return samples


def measure(store_path: str, calls: int, experts: int, stub: str) -> None:
    import grpc
    import torch

    from common.host_address import HostAddress
    from common.rpc import expert_host_pb2 as pb
    from common.rpc import expert_host_pb2_grpc as pb_grpc
    from common.store.reader import ExpertStore
    from coordinator.runtime.fetch_loop import FetchLoop
    from coordinator.sources.host_client import ClientCredentials, HostClient

    store = ExpertStore(store_path)
    layer, hidden_size = min(store.manifest.experts).layer, store.config.hidden_size
    hidden, weights = torch.randn(1, hidden_size).to(torch.bfloat16), torch.ones(1, experts)  # [1, H], [1, n]
    folder = Path(tempfile.mkdtemp(prefix="hops-"))
    address_file = folder / "address"
    host, address = start_host([sys.executable, __file__, "--host", stub, "--store", store_path, "--listen", "127.0.0.1:0",
                                "--address-file", str(address_file), "--log-level", "warning"], address_file)
    fetch_loop = FetchLoop()
    try:
        async def open_client():
            return HostClient(HostAddress.parse(address), ClientCredentials(), stream_runs=True)

        client = fetch_loop.run(open_client())

        def call():
            return client.run_experts(layer, list(range(experts)), hidden, weights, timeout_s=30)

        async def on_loop():
            samples = []
            for _ in range(calls):
                started = time.perf_counter()
                await call()
                samples.append(time.perf_counter() - started)
            return samples

        print(f"{store_path}: {experts} experts a call, {calls} calls each, the host: {stub}")
        print(f"  submitted from this thread (the decode's way) {summary(timed(calls, lambda: fetch_loop.run(call())))}")
        print(f"  on the fetch loop                            {summary(fetch_loop.run(on_loop()))}")
        requests: queue.Queue = queue.Queue()
        replies = pb_grpc.ExpertHostStub(grpc.insecure_channel(address)).RunExpertsStream(iter(requests.get, None))
        request = pb.RunExpertsRequest(layer=layer, experts=list(range(experts)), dtype="bfloat16", shape=[1, hidden_size],
                                       hidden=hidden.view(torch.int16).numpy().tobytes(), weights=weights.numpy().tobytes())

        def blocking():
            request.request_id += 1
            requests.put(request)
            next(replies)

        print(f"  grpcio's blocking stream, from this thread   {summary(timed(calls, blocking))}")
        requests.put(None)
        unary = pb_grpc.ExpertHostStub(grpc.insecure_channel(address)).RunExperts

        def blocking_unary():
            request.request_id += 1
            unary(request, timeout=30)

        print(f"  grpcio's blocking unary call, this thread    {summary(timed(calls, blocking_unary))}")
        fetch_loop.run(client.close())
    finally:
        fetch_loop.close()
        host.terminate()
        host.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--host":
        return stub_host(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--stubs", default=",".join(STUBS), help=f"the host's stubs to measure, of {', '.join(STUBS)}")
    args = parser.parse_args()
    for stub in args.stubs.split(","):
        if stub not in STUBS:
            parser.error(f"--stubs: {stub} is not one of {', '.join(STUBS)}")
        measure(args.store, args.calls, args.experts, stub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
