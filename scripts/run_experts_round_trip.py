"""The per-layer round trip of RunExperts: unary calls (what host_client.py makes) against one
long-lived bidirectional stream carrying the same messages, on TCP loopback and a Unix socket.

The server is the real ExpertHostServicer over a shard of STORE in RAM; the stream is a
prototype handler here (not in proto/) that answers each request of the stream through the same
servicer.RunExperts. One call = one layer: `--experts` experts of layer 0 on one token. Prints
the round trip and the round trip minus the host's own compute_s (what the transport costs).

    python scripts/run_experts_round_trip.py --store STORE [--calls 400] [--experts 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch

from common.rpc import expert_host_pb2 as pb
from common.rpc.wire_limits import channel_options, server_options
from common.store.reader import ExpertStore
from expert_host.expert_runner import ExpertRunner
from expert_host.servicer import SERVICE_NAME, ExpertHostServicer, add_to_server
from expert_host.shard import ExpertShard

STREAM_METHOD = "RunExpertsStream"  # the prototype's name


async def measure(store_path: str, calls: int, experts: int) -> None:
    store = ExpertStore(store_path)
    shard = ExpertShard(store, sorted(store.manifest.experts), progress=False)
    runner = ExpertRunner(shard)
    servicer = ExpertHostServicer()
    servicer.serve_shard(shard, runner, memory_gbps=0.0, expert_ms=0.0)

    async def run_stream(requests, context):
        async for request in requests:
            yield await servicer.RunExperts(request, context)

    server = grpc.aio.server(options=server_options())
    add_to_server(servicer, server)
    stream_handler = grpc.stream_stream_rpc_method_handler(
        run_stream, request_deserializer=pb.RunExpertsRequest.FromString,
        response_serializer=pb.RunExpertsReply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {STREAM_METHOD: stream_handler}),))
    socket = Path(tempfile.mkdtemp(prefix="rtt-")) / "host.sock"
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    hidden = store.config.hidden_size
    request = pb.RunExpertsRequest(layer=min(store.manifest.experts).layer, experts=list(range(experts)), dtype="bfloat16",
                                   shape=[1, hidden], hidden=torch.randn(1, hidden).to(torch.bfloat16).view(torch.uint8).numpy().tobytes(),
                                   weights=torch.ones(1, experts).numpy().tobytes(), model_id=store.manifest.model_id)
    print(f"{store_path}: hidden {hidden}, {experts} experts per call, {calls} calls each (the first quarter not counted)")
    try:
        for name, target in (("tcp loopback", f"127.0.0.1:{port}"), ("unix socket", f"unix:{socket}")):
            async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
                unary = channel.unary_unary(f"/{SERVICE_NAME}/RunExperts",
                                            request_serializer=pb.RunExpertsRequest.SerializeToString,
                                            response_deserializer=pb.RunExpertsReply.FromString)
                samples = []
                for _ in range(calls):
                    started = time.perf_counter()
                    reply = await unary(request, timeout=30)
                    samples.append((time.perf_counter() - started, reply.compute_s))
                report(name, "unary", samples[calls // 4:])
                stream = channel.stream_stream(f"/{SERVICE_NAME}/{STREAM_METHOD}",
                                               request_serializer=pb.RunExpertsRequest.SerializeToString,
                                               response_deserializer=pb.RunExpertsReply.FromString)()
                samples = []
                for _ in range(calls):
                    started = time.perf_counter()
                    await stream.write(request)
                    reply = await stream.read()
                    samples.append((time.perf_counter() - started, reply.compute_s))
                await stream.done_writing()
                report(name, "stream", samples[calls // 4:])
    finally:
        await server.stop(0)
        runner.close()
        socket.unlink(missing_ok=True)
        socket.parent.rmdir()


def report(name: str, kind: str, samples: list[tuple[float, float]]) -> None:
    trips = sorted(t for t, _ in samples)
    overhead = sorted(t - c for t, c in samples)
    print(f"{name:>12} {kind:>6}: round trip median {statistics.median(trips) * 1e3:.3f} ms "
          f"(p10 {trips[len(trips) // 10] * 1e3:.3f}); minus the host's compute: median "
          f"{statistics.median(overhead) * 1e3:.3f} ms (p10 {overhead[len(overhead) // 10] * 1e3:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the host's compute (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    asyncio.run(measure(args.store, args.calls, args.experts))


if __name__ == "__main__":
    main()
