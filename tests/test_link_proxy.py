"""The shaped link (`python -m expert_host link-proxy`): bytes arrive intact and no faster than
the rate and the round trip allow (lower bounds only: a loaded machine may be slower, never
faster), and a coordinator reaches an expert host through it with the same greedy tokens."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import pytest

from common.errors import ConfigError
from common.host_address import HostAddress
from conftest import expert_host_cli
from expert_host import link_proxy
from expert_host.link_proxy import LinkLoop, LinkProxy, LinkShape, parse_rate
from expert_host_processes import expert_hosts  # noqa: F401 (a fixture)


class ProxyThread:
    """A LinkProxy on its own event loop (the command's: LinkLoop) in a thread, in front of `to`."""

    def __init__(self, to: str, shape: LinkShape) -> None:
        self.loop = LinkLoop()
        self.proxy = LinkProxy(HostAddress.parse("127.0.0.1:0", allow_any_port=True), HostAddress.parse(to), shape)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(timeout=10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class EchoServer(ProxyThread):
    """A TCP echo server on its own loop: what the proxy relays to in the timing tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def start():
            self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
            return "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

        self.address = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def shaped(to: str, *, rate: str, rtt_ms: float) -> ProxyThread:
    return ProxyThread(to, LinkShape(parse_rate(rate), rtt_ms / 1000))


async def _round_trip(address: str, payload: bytes, rounds: int) -> tuple[bytes, float]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
    started = time.monotonic()
    received = bytearray()
    for _ in range(rounds):
        writer.write(payload)
        await writer.drain()
        received += await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    elapsed = time.monotonic() - started
    writer.close()
    return bytes(received), elapsed


def test_rates_are_read_in_bits_or_bytes_and_nonsense_is_refused():
    assert parse_rate("1gbit") == 125e6 and parse_rate("2.5gbit") == 312.5e6 and parse_rate("10Gbit") == 1.25e9
    assert parse_rate("100mbit") == 12.5e6 and parse_rate("125MB") == 125e6
    for bad in ("fast", "0gbit", "1 parsec", "-1gbit"):
        with pytest.raises(ConfigError, match="--rate"):
            parse_rate(bad)


def test_bytes_cross_intact_and_no_faster_than_the_rate(echo):
    proxy = shaped(echo.address, rate="100mbit", rtt_ms=1)
    try:
        payload = os.urandom(2_000_000)
        received, elapsed = asyncio.run(_round_trip(proxy.address, payload, rounds=1))
    finally:
        proxy.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    floor = len(payload) / parse_rate("100mbit")  # out and back overlap: the echo returns bytes as they come
    assert floor * 0.95 <= elapsed < floor + 20, (elapsed, floor)


def test_each_round_trip_takes_at_least_the_rtt(echo):
    proxy = shaped(echo.address, rate="10gbit", rtt_ms=20)
    try:
        _, elapsed = asyncio.run(_round_trip(proxy.address, b"ping", rounds=10))
    finally:
        proxy.close()
    assert 10 * 0.020 * 0.95 <= elapsed < 10, elapsed


def test_the_commands_loop_waits_on_its_own_timers_and_others_on_a_thread(monkeypatch):
    """A wait under a millisecond: on LinkLoop (select's microsecond timeout) asyncio's timer,
    never a worker thread's sleep; on the default loop (epoll's milliseconds) a thread's."""
    threads = []

    async def thread_sleep(function, *args):
        threads.append(args)
        function(*args)

    monkeypatch.setattr(link_proxy.asyncio, "to_thread", thread_sleep)
    async def wait():  # the deadline taken on the loop: a loaded machine may spend 0.2 ms starting one
        await link_proxy._sleep_until(time.monotonic() + 0.0002)

    loop = LinkLoop()
    try:
        loop.run_until_complete(wait())
    finally:
        loop.close()
    assert threads == []
    asyncio.run(wait())
    assert len(threads) == 1


def test_a_coordinator_through_the_shaped_link_gets_the_in_process_tokens(store16, expert_hosts):  # noqa: F811
    from common.host_address import HostAddress as Address
    from coordinator.runtime.engine import Engine
    from coordinator.sources.cluster_config import ClusterConfig
    from coordinator.sources.expert_pool import ExpertPool

    def tokens(**options):
        with Engine.open(store16, cache_experts=2, **options) as engine:
            generation = engine.generate("Hello world", max_new_tokens=8, stop_at_eos=False)
            list(generation)
            return generation.token_ids, generation.stats

    host = expert_hosts.start(store16)
    proxy = shaped(host.address, rate="1gbit", rtt_ms=0.3)
    try:
        source = ExpertPool.source_factory(ClusterConfig(hosts=(Address.parse(proxy.address),)))
        through_link, stats = tokens(source=source)
    finally:
        proxy.close()
    assert through_link == tokens(source="ram")[0]
    assert stats.bytes_by_source[proxy.address] == stats.bytes_fetched > 0


def test_the_command_refuses_a_lan_address_a_bad_rate_and_a_negative_rtt():
    for args, named in ((["--listen", "0.0.0.0:0"], "loopback only"), (["--rate", "fast"], "--rate fast"),
                        (["--rtt-ms", "-1"], "--rtt-ms -1")):
        result = expert_host_cli("link-proxy", "--to", "127.0.0.1:50051", *args)
        assert result.returncode == 2, result.stderr
        assert named in result.stderr.strip().splitlines()[-1]


def test_placement_run_moves_under_one_percent_of_the_bytes_copy_moves_per_token(store16, expert_hosts):  # noqa: F811
    """Issue 9: through a slow link, running the missing experts on the host that holds them moves
    activations (a few KB a token) where copying moves the experts; counted at the link, both ways."""
    from common.host_address import HostAddress as Address
    from coordinator.runtime.engine import Engine
    from coordinator.sources.cluster_config import ClusterConfig
    from coordinator.sources.expert_pool import ExpertPool

    host = expert_hosts.start(store16)
    proxy = shaped(host.address, rate="100mbit", rtt_ms=1)

    def bytes_per_decode_token(placement: str) -> float:
        source = ExpertPool.source_factory(ClusterConfig(hosts=(Address.parse(proxy.address),)))
        with Engine.open(store16, source=source, cache_experts=2, prefetch=False, placement=placement) as engine:
            stream = list(range(40, 56))  # the same fed tokens for both placements
            with engine.forced_decode(engine.encode("Hello world"), len(stream)) as run:
                run.prefill()  # the prompt always copies: count the decode steps only
                before = proxy.proxy.bytes_carried
                for token in stream:
                    run.step(token)
                return (proxy.proxy.bytes_carried - before) / len(stream)

    try:
        copied = bytes_per_decode_token("copy")
        ran = bytes_per_decode_token("run")
    finally:
        proxy.close()
    print(f"bytes across the link per decode token: copy {copied:.0f}, run {ran:.0f} ({ran / copied:.2%})")
    assert copied > 100_000  # experts of 393 KB crossed it
    assert ran < 0.01 * copied, (ran, copied)


async def _bulk(address: str, nbytes: int) -> float:
    """Send nbytes through the echo and read them back: the seconds it took."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
    started = time.monotonic()

    async def send():
        for offset in range(0, nbytes, 65536):
            writer.write(b"x" * min(65536, nbytes - offset))
            await writer.drain()

    sending = asyncio.ensure_future(send())
    await asyncio.wait_for(reader.readexactly(nbytes), 60)
    await sending
    writer.close()
    return time.monotonic() - started


def test_two_bulk_transfers_at_once_share_the_rate(echo):
    """One link, not one per connection: together no faster than the rate (a lower bound)."""
    proxy = shaped(echo.address, rate="100mbit", rtt_ms=1)
    nbytes = 1_000_000

    async def both():
        started = time.monotonic()
        await asyncio.gather(_bulk(proxy.address, nbytes), _bulk(proxy.address, nbytes))
        return time.monotonic() - started

    try:
        elapsed = asyncio.run(both())
    finally:
        proxy.close()
    floor = 2 * nbytes / parse_rate("100mbit")
    assert floor * 0.95 <= elapsed < floor + 20, (elapsed, floor)


def test_a_small_message_passes_a_bulk_transfer_on_another_connection(echo):
    """Fair turns between connections: a ping waits behind about a chunk of the bulk transfer
    (64 KB: 52 ms each way at 10 Mbit/s), not behind everything it has queued (~0.5 MB per
    direction: ~0.42 s each way, so first in, first out would take > 0.8 s a round trip). Slow
    enough that a loaded machine's scheduling stays small beside either."""
    proxy = shaped(echo.address, rate="10mbit", rtt_ms=1)

    async def pings_during_bulk():
        bulk = asyncio.ensure_future(_bulk(proxy.address, 3_000_000))  # ~2.4 s each way
        await asyncio.sleep(0.6)  # the bulk transfer fills its share of the link first
        trips = []
        for _ in range(3):
            _, elapsed = await _round_trip(proxy.address, b"ping", rounds=1)
            trips.append(elapsed)
        await bulk
        return sorted(trips)[len(trips) // 2]

    try:
        median = asyncio.run(pings_during_bulk())
    finally:
        proxy.close()
    assert median < 0.4, median


def test_a_clients_runs_and_its_fetches_take_two_connections(store16, expert_hosts):  # noqa: F811
    """RunExperts on a TCP connection of their own, so that over a link a run's few KB do not
    queue behind the expert chunks a fetch has written to the same HTTP/2 connection."""
    from common.host_address import HostAddress as Address
    from coordinator.runtime.engine import Engine
    from coordinator.sources.cluster_config import ClusterConfig
    from coordinator.sources.expert_pool import ExpertPool

    host = expert_hosts.start(store16)
    proxy = shaped(host.address, rate="10gbit", rtt_ms=0.3)
    try:
        source = ExpertPool.source_factory(ClusterConfig(hosts=(Address.parse(proxy.address),)))
        with Engine.open(store16, source=source, cache_experts=2, placement="run") as engine:
            generation = engine.generate("Hello world", max_new_tokens=4, stop_at_eos=False)
            list(generation)  # the prompt's experts are fetched, the decode steps' misses run there
            connections = len(proxy.proxy._connections)
            stats = generation.stats
    finally:
        proxy.close()
    assert stats.bytes_fetched > 0 and sum(stats.run_bytes_by_source.values()) > 0
    assert connections == 2
