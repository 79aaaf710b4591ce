"""A TCP proxy that behaves like a slower network link: a bandwidth and a round-trip time, so
one machine can show what 1 GbE, 2.5 GbE or 10 GbE between a coordinator and an expert host do.

    python -m expert_host link-proxy --listen 127.0.0.1:50061 --to 127.0.0.1:50051 --rate 1gbit --rtt-ms 0.3

The proxy is one link: each direction is shared by every connection through it, as one network
port is shared by a machine's flows. A chunk that arrives waits for the link (bytes / rate: the
serialization time) and then reaches the far side half a round trip later (the propagation
delay). The link takes chunks round-robin from the connections that have one waiting, as a NIC
with fair queueing interleaves flows: a small message (a RunExperts request or reply) waits
behind about one chunk of a bulk transfer on another connection (an expert being copied), not
behind all of it; two bulk transfers at once share the rate. At most about a bandwidth-delay
product plus a few chunks is held per connection and direction; past that the proxy stops
reading it, so TCP's own flow control pushes back on the sender, as a real link's queue does.

Knows nothing of gRPC or experts: bytes in, the same bytes out, later."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import re
import selectors
import time
from collections import deque
from dataclasses import dataclass, field

from common.errors import ConfigError
from common.host_address import HostAddress

CHUNK_BYTES = 64 * 1024
# How far ahead of the link's clock chunks are given their turn: what a chunk that arrives on an
# idle connection may wait behind the others' (besides the chunk on the wire). Short, so that
# small messages pass a bulk transfer; not shorter, since each wake of the scheduler costs a
# thread's sleep (see _sleep_until) and at 10 GbE a 64 KB chunk is 52 us of link.
LOOKAHEAD_S = 0.0003
_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def parse_rate(text: str) -> float:
    """'1gbit', '2.5gbit', '100mbit', '125MB' -> bytes per second (per direction)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--rate {text}: give a positive number and a unit, e.g. 1gbit, 2.5gbit, 100mbit or 125MB")
    return float(match.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class LinkShape:
    rate_bytes_per_s: float  # each direction
    rtt_s: float

    def describe(self) -> str:
        return f"{self.rate_bytes_per_s * 8 / 1e9:g} Gbit/s each way, {self.rtt_s * 1000:g} ms round trip"

    @property
    def in_flight_bytes(self) -> int:
        """What one connection's direction holds before it stops reading: its bandwidth-delay product, plus room."""
        return int(self.rate_bytes_per_s * self.rtt_s) + 8 * CHUNK_BYTES


_PR_SET_TIMERSLACK = 29  # prctl's option for the calling thread's timer slack, in ns (linux/prctl.h)


class LinkLoop(asyncio.SelectorEventLoop):
    """The proxy's event loop: timers that wake within tens of microseconds. asyncio's default
    selector (epoll) waits in whole milliseconds, so a 0.15 ms wait took 1.1 ms and added two
    to every round trip of a link meant to take 0.3; select() takes microseconds (and a proxy
    holds a handful of sockets, far below its descriptor limit). The timer slack of the thread
    that runs it is cut to 1 ns where Linux allows (else 50 us are added to every wake)."""

    fine_timers = True

    def __init__(self) -> None:
        super().__init__(selectors.SelectSelector())

    def run_forever(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: the default slack stays
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)  # this thread's, the one that runs the loop
        super().run_forever()


async def _sleep_until(due: float) -> None:
    """Wake at `due` (time.monotonic()). On a LinkLoop, asyncio's own timer. On another loop
    (whose timers wake in whole milliseconds) the last millisecond is slept on a worker
    thread, whose time.sleep wakes within tens of microseconds (0.3 ms for 0.15 on a busy
    2-core machine, and at times ms later: measured 2026-12-02)."""
    delay = due - time.monotonic()
    if getattr(asyncio.get_running_loop(), "fine_timers", False):
        if delay > 0:
            await asyncio.sleep(delay)
        return
    if delay > 0.002:
        await asyncio.sleep(delay - 0.001)
        delay = due - time.monotonic()
    if delay > 0:
        await asyncio.to_thread(time.sleep, delay)


@dataclass(eq=False)
class _Flow:
    """One direction of one connection: chunks read and waiting for their turn on the link, then
    chunks given a time on it and waiting to be delivered."""

    room: asyncio.Semaphore  # chunks it may hold, read and not yet delivered
    waiting: deque = field(default_factory=deque)  # chunks read, not yet given their turn
    deliveries: asyncio.Queue = field(default_factory=asyncio.Queue)  # (due, chunk), None at the end


class _SharedLink:
    """One direction of the link: one clock for every connection, turns taken round-robin
    among the flows with a chunk waiting (a NIC's fair queueing, coarsely)."""

    def __init__(self, shape: LinkShape, carried: list[int]) -> None:
        self.shape, self.carried = shape, carried
        self._ring: deque[_Flow] = deque()  # flows with chunks waiting, in turn order
        self._wake = asyncio.Event()
        self._link_free = 0.0  # when the link has sent every chunk given a turn so far
        self._scheduler: asyncio.Task | None = None

    def flow(self) -> _Flow:
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())
        return _Flow(asyncio.Semaphore(max(1, self.shape.in_flight_bytes // CHUNK_BYTES)))

    def offer(self, flow: _Flow, chunk: bytes) -> None:
        if not flow.waiting:
            self._ring.append(flow)
        flow.waiting.append(chunk)
        self._wake.set()

    async def _schedule(self) -> None:
        rate, half_rtt = self.shape.rate_bytes_per_s, self.shape.rtt_s / 2
        while True:
            if not self._ring:
                self._wake.clear()
                await self._wake.wait()
                continue
            ahead = self._link_free - time.monotonic()
            if ahead > LOOKAHEAD_S:  # the link is busy for a while: give the next turn later
                await _sleep_until(self._link_free - LOOKAHEAD_S)
            flow = self._ring.popleft()
            chunk = flow.waiting.popleft()
            if flow.waiting:
                self._ring.append(flow)  # its next chunk waits for the others' turns
            self._link_free = max(time.monotonic(), self._link_free) + len(chunk) / rate
            flow.deliveries.put_nowait((self._link_free + half_rtt, chunk))

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay one connection's direction over this link until its reader ends."""
        flow = self.flow()

        async def receive() -> None:
            try:
                while chunk := await reader.read(CHUNK_BYTES):
                    await flow.room.acquire()
                    self.offer(flow, chunk)
            finally:
                self.offer(flow, b"")  # the end, in turn after the chunks before it

        async def deliver() -> None:
            while True:
                due, chunk = await flow.deliveries.get()
                if not chunk:
                    break
                await _sleep_until(due)
                writer.write(chunk)
                self.carried[0] += len(chunk)
                flow.room.release()
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        await asyncio.gather(receive(), deliver())

    async def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)


class LinkProxy:
    """Accepts on `listen`, connects each client to `to`, shapes both directions."""

    def __init__(self, listen: HostAddress, to: HostAddress, shape: LinkShape) -> None:
        if listen.is_unix or to.is_unix:
            raise ConfigError("link-proxy shapes TCP links: --listen and --to take HOST:PORT")
        if not listen.is_loopback:  # it relays to a host without adding TLS or a token: never on a LAN
            raise ConfigError(f"--listen {listen}: link-proxy is a test and benchmark tool and listens on loopback only")
        self.listen, self.to, self.shape = listen, to, shape
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()  # one task per client connection, ended at close
        self.address = ""
        self.bytes_to_host = [0]  # every byte that crossed the link, each way (a list: the pumps add to it)
        self.bytes_to_client = [0]
        self._to_host = _SharedLink(shape, self.bytes_to_host)  # the link's two directions, shared by all connections
        self._to_client = _SharedLink(shape, self.bytes_to_client)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, self.listen.host, self.listen.port)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self.address

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._relay(client_reader, client_writer)
        except asyncio.CancelledError:
            pass  # close() ends it: a cancelled connection task would be logged as an error by asyncio's streams
        finally:
            self._connections.discard(task)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.to.host, self.to.port)
        except OSError:
            client_writer.close()  # the client sees the connection refused, as without the proxy
            return
        try:
            await asyncio.gather(self._to_host.carry(client_reader, upstream_writer),
                                 self._to_client.carry(upstream_reader, client_writer))
        except (ConnectionError, OSError):
            pass  # one side went away: close both
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()

    @property
    def bytes_carried(self) -> int:
        """Bytes that crossed the link so far, both directions, everything included (gRPC's framing too)."""
        return self.bytes_to_host[0] + self.bytes_to_client[0]

    async def close(self) -> None:
        """Stop accepting, end the connections still open (a client that has not closed its
        channel yet), then wait for the server: nothing is left pending on the loop."""
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
        for link in (self._to_host, self._to_client):
            await link.close()


def run_link_proxy(*, listen: str, to: str, rate: str, rtt_ms: float) -> None:
    """Serve until SIGTERM or Ctrl-C (what `python -m expert_host link-proxy` runs)."""
    import signal

    if rtt_ms < 0:
        raise ConfigError(f"--rtt-ms {rtt_ms}: must not be negative")
    shape = LinkShape(parse_rate(rate), rtt_ms / 1000)
    proxy = LinkProxy(HostAddress.parse(listen, what="--listen", allow_any_port=True),
                      HostAddress.parse(to, what="--to"), shape)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            address = await proxy.start()
        except OSError as err:
            raise ConfigError(f"--listen {listen}: cannot listen there ({err.strerror})") from None
        print(f"link-proxy on {address} -> {to} ({shape.describe()})", flush=True)
        await stop.wait()
        await proxy.close()

    loop = LinkLoop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()
