"""The benchmark's yardstick: the same expert bytes sent over a plain TCP socket, no gRPC.

`python -m expert_host.raw_copy --store STORE --address-file F` holds the store in RAM like a
host and, per connection, answers each 8-byte request (layer, expert as two little-endian
uint32) with the blob's bytes, written straight from memory. `receive_into` is the other end:
it reads straight into the caller's buffer. Nothing is checked: this is the upper bound."""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
from pathlib import Path

from common.expert_id import ExpertId
from common.store.reader import ExpertStore

from .shard import ExpertShard

REQUEST = struct.Struct("<II")


async def _serve_connection(shard: ExpertShard, connection: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with connection:
        while request := await loop.sock_recv(connection, REQUEST.size):
            if len(request) != REQUEST.size:
                return
            await loop.sock_sendall(connection, await shard.blob(ExpertId(*REQUEST.unpack(request))))


async def _serve(shard: ExpertShard, address_file: Path) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    address_file.write_text(f"127.0.0.1:{listener.getsockname()[1]}\n")
    while True:
        connection, _ = await loop.sock_accept(listener)
        connection.setblocking(False)
        loop.create_task(_serve_connection(shard, connection))


async def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return sock


async def receive_into(sock: socket.socket, eid: ExpertId, out: memoryview) -> None:
    """Ask for `eid`'s blob and read it into `out` (its exact size)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, REQUEST.pack(eid.layer, eid.expert))
    received = 0
    while received < len(out):
        count = await loop.sock_recv_into(sock, out[received:])
        if count == 0:
            raise ConnectionError(f"the raw sender closed the connection after {received} of {len(out)} bytes")
        received += count


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m expert_host.raw_copy", description=__doc__)
    parser.add_argument("--store", required=True, help="the packed store")
    parser.add_argument("--address-file", required=True, type=Path, help="where to write the bound address")
    args = parser.parse_args()
    store = ExpertStore(args.store)
    shard = ExpertShard(store, sorted(store.manifest.experts), progress=False)
    asyncio.run(_serve(shard, args.address_file))


if __name__ == "__main__":
    main()
