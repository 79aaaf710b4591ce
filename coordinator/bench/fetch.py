"""`bench-fetch`: how fast one expert host streams experts over loopback, against a raw socket
copy of the same bytes on the same machine.

Starts an expert host (`serve`, all experts in RAM) and a raw sender (raw_copy.py) as child
processes on 127.0.0.1, then, in this process, fetches experts round-robin for a few seconds:
through the coordinator's own fetch path (an ExpertPool of that one host: gRPC
streaming into a preallocated buffer, checksum verified) and through the raw socket (read straight into the same
kind of buffer, nothing checked), with one stream and with several in parallel."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from common.errors import HostError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.python_module import module_command
from common.store.reader import ExpertStore

from expert_host import raw_copy


@dataclass(frozen=True)
class Measurement:
    path: str  # "grpc" | "raw socket"
    streams: int
    gb_per_s: float
    experts: int
    seconds: float
    client_cpu_s_per_gb: float  # CPU time of this process (all its threads) per GB received
    sender_cpu_s_per_gb: float  # CPU time of the sending process per GB


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _start(module_args: list[str], address_file: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    command, env = module_command(*module_args)
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not address_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise HostError(f"`python -m {' '.join(module_args)}` did not start (exit code {process.poll()})")
        time.sleep(0.05)
    return process, address_file.read_text().strip()


async def _measure(path: str, sender: psutil.Process, streams: int, seconds: float, blob_nbytes: int, experts: list[ExpertId],
                   open_stream: Callable[[], Awaitable[Callable[[ExpertId, torch.Tensor], Awaitable[None]]]]) -> Measurement:
    """Each stream fetches experts round-robin into its own touched buffer for `seconds`."""
    fetchers = [await open_stream() for _ in range(streams)]
    buffers = [torch.ones(blob_nbytes, dtype=torch.uint8) for _ in range(streams)]  # [blob bytes]
    for fetch, buffer in zip(fetchers, buffers):  # warm up: connections, first touch, caches
        await fetch(experts[0], buffer)
    done = [0] * streams
    client, sender_cpu = _cpu_s(psutil.Process()), _cpu_s(sender)
    started = time.perf_counter()

    async def run(stream: int) -> None:
        for eid in itertools.islice(itertools.cycle(experts), stream, None):  # streams start at different experts
            if time.perf_counter() - started > seconds:
                return
            await fetchers[stream](eid, buffers[stream])
            done[stream] += 1

    await asyncio.gather(*(run(stream) for stream in range(streams)))
    elapsed = time.perf_counter() - started
    gigabytes = sum(done) * blob_nbytes / 1e9
    return Measurement(path, streams, gigabytes / elapsed, sum(done), elapsed,
                       (_cpu_s(psutil.Process()) - client) / gigabytes, (_cpu_s(sender) - sender_cpu) / gigabytes)


async def _measure_raw(store: ExpertStore, sender: psutil.Process, raw_address: str, streams: int, seconds: float) -> Measurement:
    sockets = []

    async def raw_stream():
        sock = await raw_copy.connect(raw_address)
        sockets.append(sock)

        async def fetch(eid: ExpertId, out: torch.Tensor) -> None:
            await raw_copy.receive_into(sock, eid, memoryview(out.numpy()))
        return fetch

    try:
        return await _measure("raw socket", sender, streams, seconds, store.blob_nbytes, sorted(store.manifest.experts), raw_stream)
    finally:
        for sock in sockets:
            sock.close()


def _measure_all(store: ExpertStore, host: psutil.Process, grpc_address: str, raw: psutil.Process, raw_address: str,
                 streams: list[int], seconds: float, chunk_bytes: int) -> list[Measurement]:
    """Both paths on a FetchLoop, the gRPC one through an ExpertPool: the coordinator's own fetch path."""
    from coordinator.runtime.fetch_loop import FetchLoop
    from coordinator.sources.cluster_config import ClusterConfig, PoolSettings
    from coordinator.sources.expert_pool import ExpertPool

    fetch_loop = FetchLoop()
    cluster = ClusterConfig(hosts=(HostAddress.parse(grpc_address),), pool=PoolSettings(fetch_deadline_s=120, chunk_bytes=chunk_bytes))
    pool = ExpertPool.open(cluster, store.manifest, fetch_loop)

    async def grpc_stream():
        return pool.fetch_into

    results = []
    try:
        for count in streams:
            results.append(fetch_loop.run(_measure("grpc", host, count, seconds, store.blob_nbytes, sorted(store.manifest.experts), grpc_stream)))
            results.append(fetch_loop.run(_measure_raw(store, raw, raw_address, count, seconds)))
    finally:
        pool.close()
        fetch_loop.close()
    return results


def bench_fetch(*, store: str | Path, streams: list[int], seconds: float = 3.0, chunk_bytes: int = 0) -> list[Measurement]:
    opened = ExpertStore(store, with_experts=False)
    processes = []
    with tempfile.TemporaryDirectory(prefix="moe-edge-bench-") as folder:
        try:
            host, grpc_address = _start(["expert_host", "serve", "--store", str(store), "--listen", "127.0.0.1:0",
                                         "--address-file", f"{folder}/host", "--log-level", "warning"], Path(folder, "host"))
            processes.append(host)
            raw, raw_address = _start(["expert_host.raw_copy", "--store", str(store), "--address-file", f"{folder}/raw"],
                                      Path(folder, "raw"))
            processes.append(raw)
            return _measure_all(opened, psutil.Process(host.pid), grpc_address, psutil.Process(raw.pid), raw_address,
                                streams, seconds, chunk_bytes)
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)


def report(measurements: list[Measurement], *, blob_nbytes: int, as_json: bool) -> str:
    raw = {m.streams: m.gb_per_s for m in measurements if m.path == "raw socket"}
    if as_json:
        rows = [dict(asdict(m), ratio_to_raw=m.gb_per_s / raw[m.streams]) for m in measurements]
        return json.dumps({"blob_nbytes": blob_nbytes, "cpus": os.cpu_count(), "measurements": rows}, indent=1)
    lines = [f"expert blob {blob_nbytes / 1e6:.1f} MB, {os.cpu_count()} CPUs, loopback",
             f"{'path':<12} {'streams':>7} {'GB/s':>7} {'of raw':>7} {'experts':>8} {'client CPU s/GB':>16} {'sender CPU s/GB':>16}"]
    for m in measurements:
        lines.append(f"{m.path:<12} {m.streams:>7} {m.gb_per_s:>7.2f} {m.gb_per_s / raw[m.streams]:>7.0%} {m.experts:>8} "
                     f"{m.client_cpu_s_per_gb:>16.2f} {m.sender_cpu_s_per_gb:>16.2f}")
    return "\n".join(lines)
