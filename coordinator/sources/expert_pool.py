"""ExpertPool: the expert source backed by one or more expert hosts.

At open it asks every host's Info (waiting for one still loading its shard), checks that each serves our store (format version, model
identity) and that every expert is held somewhere. A fetch goes to the replica with the fewest
fetches in flight; a failure (an error, a missed deadline, a bad checksum) marks that host down
and the fetch moves to another replica. A host marked down is probed again with Info after a
backoff that doubles up to a bound; a probe asks grpc.health.v1 first, so a host that is back but
still loading its shard (NOT_SERVING) is probed at the shortest interval until it says SERVING,
then Info; when Info answers it takes fetches again. When no replica is up, the hosts marked
down get one more direct try. If that fails too and some host holding the expert is
unreachable or loading (it may be restarting), the fetch waits for one to come back, up to
`host_restart_wait_s`, with its hosts probed at the shortest interval meanwhile; then it fails
with an ExpertUnavailableError naming the expert and every host tried. A host that answers
wrongly (a bad checksum, a missed deadline) is not waited for.

`run_layer` runs a layer's chosen experts on the hosts instead (RunExperts): the experts are
grouped by an up host that holds them (as few hosts as cover them, one call per host, all at
once), the replies summed. Each call is one request on the host's long-lived RunExpertsStream
(or a unary RunExperts call with `run_experts = "unary"`, see host_client.py); the deadline,
the failover and the counters are the same either way. A host that fails or misses the deadline is marked down as for a
fetch and its experts move to another holder; with none left it fails at once, without the
restart wait (the caller can fetch the experts instead), with an ExpertUnavailableError naming
the experts and the hosts tried. The decode does not wait for the fetch loop to make those calls:
`start_run_here` sends them from its own thread on each host's blocking stream and
`finish_run_here` reads the replies there (blocking_run_stream.py: no hand-off to the loop and
back); a group whose host fails, or will not take it, goes to run_layer on the fetch loop, its
host marked down and not tried again.

Knows nothing of caches or devices. All of it runs on the fetch loop, except start_run_here and
finish_run_here (one thread at a time) and the few read-only accessors for stats and metrics
(bytes_by_origin, fetches_by_origin, host_status, run_seconds_by_origin, run_bytes_by_origin).

Shapes: T = tokens, H = hidden size, n = experts of a run_layer call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import torch

from common.errors import ConfigError, ExpertUnavailableError, HostError
from common.expert_id import ExpertId
from common.malloc_tuning import keep_freed_buffers_for_reuse
from common.store.manifest import FORMAT_VERSION, Manifest

from ..runtime.fetch_loop import FetchLoop
from .cluster_config import ClusterConfig, PoolSettings
from .host_client import ClientCredentials, HostCallError, HostClient, HostInfo

log = logging.getLogger(__name__)


@dataclass
class RunsHere:
    """A layer's RunExperts requests sent by ExpertPool.start_run_here: per host, its experts,
    their weight columns and the request in flight; the groups that failed (host, experts,
    columns, error: None where the host was not tried) go to run_layer."""
    layer: int
    hidden: torch.Tensor
    started: float
    sent: list = field(default_factory=list)
    failed: list = field(default_factory=list)


@dataclass(eq=False)
class _Host:
    client: HostClient
    experts: frozenset[ExpertId] = frozenset()  # empty until it has answered Info
    expert_ms: float = 0.0  # its Info: one expert at batch 1 on its CPU
    up: bool = False
    in_flight: int = 0
    fetches: int = 0
    bytes: int = 0
    runs: int = 0  # RunExperts calls that succeeded
    run_seconds: float = 0.0  # their time as we waited for them (wire and the host's compute)
    run_bytes_sent: int = 0  # hidden states and weights sent in them...
    run_bytes_received: int = 0  # ...and the sums received
    failures: int = 0  # consecutive failed fetches and probes; a good fetch resets it
    last_error: str = ""
    may_come_back: bool = False  # its last failure: unreachable or loading, as a restarting host is
    loading: bool = False  # its health check said NOT_SERVING at the last probe
    prober: asyncio.Task | None = field(default=None, repr=False)
    wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set: probe it now

    @property
    def address(self) -> str:
        return str(self.client.address)


class ExpertPool:
    name = "hosts"

    def __init__(self, manifest: Manifest, fetch_loop: FetchLoop, settings: PoolSettings) -> None:
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.blob_nbytes = manifest.layout.nbytes
        self.settings = settings
        self.fetch_loop = fetch_loop
        self._hosts: list[_Host] = []
        self._came_up = asyncio.Event()  # set (then replaced) each time a host is marked up
        self._fetches_waiting = 0  # fetches waiting for a host to come back: probe often meanwhile

    @classmethod
    def open(cls, cluster: ClusterConfig, manifest: Manifest, fetch_loop: FetchLoop) -> "ExpertPool":
        """Connect to every host of `cluster` (on the fetch loop) and check what they hold."""
        if not cluster.hosts:
            raise ConfigError("no expert hosts given (--hosts, --cluster or --local-host)")
        credentials = ClientCredentials.from_config(cluster)
        keep_freed_buffers_for_reuse()  # gRPC's fresh buffer per chunk would otherwise be faulted in page by page
        pool = cls(manifest, fetch_loop, cluster.pool)
        try:
            fetch_loop.run(pool._connect(cluster, credentials))
        except BaseException:
            pool.close()
            raise
        return pool

    @classmethod
    def source_factory(cls, cluster: ClusterConfig):
        """The `source` argument of Engine.open for this cluster."""

        def open_pool(store, fetch_loop: FetchLoop) -> "ExpertPool":
            return cls.open(cluster, store.manifest, fetch_loop)

        return open_pool

    # --- opening -------------------------------------------------------------------------

    async def _connect(self, cluster: ClusterConfig, credentials: ClientCredentials) -> None:
        stream_runs = self.settings.run_experts == "stream"
        self._hosts = [_Host(HostClient(address, credentials, stream_runs=stream_runs)) for address in cluster.hosts]
        answers = await asyncio.gather(*(self._info_once_loaded(host) for host in self._hosts), return_exceptions=True)
        for host, answer in zip(self._hosts, answers):
            if isinstance(answer, HostCallError) and answer.is_setup_mistake:
                raise answer
            if isinstance(answer, BaseException):
                if not isinstance(answer, HostError):
                    raise answer
                log.warning("expert host %s does not answer (%s); it will be probed again", host.address, answer)
                self._mark_down(host, answer)
            else:
                self._check_same_store(host, answer)
                self._accept(host, answer)
                log.info("expert host %s (%s, moe-edge %s): %d experts, %.1f GB in RAM, memory copy %.1f GB/s",
                         host.address, answer.host_name, answer.version, len(answer.experts), answer.ram_bytes / 1e9,
                         answer.memory_gbps)
        silent = "; ".join(host.last_error for host in self._hosts if not host.up)
        if not any(host.up for host in self._hosts):
            raise HostError(f"no expert host answered: {silent}")
        missing = sorted(set(self.manifest.experts) - {eid for host in self._hosts for eid in host.experts})
        if missing:
            raise HostError(
                f"no expert host holds {len(missing)} of the model's {len(self.manifest.experts)} experts: "
                f"{describe_experts(missing)}" + (f"; hosts that did not answer: {silent}" if silent else "")
            )

    async def _info_once_loaded(self, host: _Host) -> HostInfo:
        """Its Info; a host still loading its shard (health NOT_SERVING) is waited for, up to
        host_restart_wait_s, so hosts and coordinator can be started together."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.host_restart_wait_s
        while True:
            try:
                return await host.client.info(timeout_s=self.settings.info_deadline_s)
            except HostCallError as err:
                if not err.may_come_back or loop.time() >= deadline or not await self._is_loading(host):
                    raise
            if not host.loading:
                log.info("expert host %s is loading its shard; waiting up to %g s for it", host.address,
                         self.settings.host_restart_wait_s)
            host.loading = True
            await asyncio.sleep(self.settings.probe_min_s)

    async def _is_loading(self, host: _Host) -> bool:
        try:
            return not await host.client.serving(timeout_s=self.settings.info_deadline_s)
        except HostError:
            return False  # not answering health either: gone, not loading

    def _check_same_store(self, host: _Host, info: HostInfo) -> None:
        """Raise HostError unless the host serves the store this coordinator opened."""
        if info.format_version != FORMAT_VERSION:
            raise HostError(
                f"expert host {host.address} serves store format version {info.format_version}; this coordinator "
                f"reads version {FORMAT_VERSION}: run the same moe-edge version on both"
            )
        if info.model_id != self.model_id or info.blob_nbytes != self.blob_nbytes:
            raise HostError(
                f"expert host {host.address} serves another store (model_id {info.model_id}, ours {self.model_id}): "
                "start it with the same store as the coordinator's --store"
            )
        unknown = sorted(info.experts - set(self.manifest.experts))
        if unknown:
            raise HostError(f"expert host {host.address} claims experts the model does not have: {describe_experts(unknown)}")

    def _accept(self, host: _Host, info: HostInfo) -> None:
        host.experts = info.experts
        host.up = True
        host.loading = False
        host.expert_ms = info.expert_ms

    def expert_seconds(self) -> float | None:
        """The fastest up host's measured time to run one expert at batch 1 (from its Info)."""
        times = [h.expert_ms for h in self._hosts if h.up and h.expert_ms > 0]
        return min(times) / 1000 if times else None

    # --- fetching ------------------------------------------------------------------------

    def resident_blob(self, eid: ExpertId) -> None:
        return None

    async def fetch_into(self, eid: ExpertId, out: torch.Tensor) -> None:
        view = memoryview(out.numpy())  # [blob bytes], written chunk by chunk
        tried: dict[_Host, str] = {}  # the last failure of each host tried, for the error
        deadline = None
        while True:
            if await self._fetch_from_any(eid, view, tried):
                return
            if self.settings.host_restart_wait_s == 0 or not any(h.may_come_back for h in self._holders(eid)):
                break
            now = asyncio.get_running_loop().time()
            if deadline is None:
                deadline = now + self.settings.host_restart_wait_s
                log.warning("%s: every host holding it is down; waiting up to %g s for one to come back (%s)", eid,
                            self.settings.host_restart_wait_s, ", ".join(h.address for h in self._holders(eid)))
            if not await self._wait_for_a_holder(eid, deadline - now):
                break
        raise ExpertUnavailableError(self._unavailable_message(eid, tried))

    async def _fetch_from_any(self, eid: ExpertId, view: memoryview, tried: dict[_Host, str]) -> bool:
        """One round: each up replica in turn, then the hosts marked down once each."""
        attempted: set[_Host] = set()
        while (host := self._choose(eid, exclude=attempted)) is not None:
            attempted.add(host)
            if await self._fetch_from(host, eid, view, tried):
                return True
        # No replica is up. Hosts marked down get one more direct try: one that came back since
        # serves at once instead of at its next probe, and a dead one fails fast.
        for host in [h for h in self._holders(eid) if not h.up and h not in attempted]:
            if await self._fetch_from(host, eid, view, tried):
                return True
        return False

    def _holders(self, eid: ExpertId) -> list[_Host]:
        return [h for h in self._hosts if eid in h.experts]

    async def _wait_for_a_holder(self, eid: ExpertId, timeout_s: float) -> bool:
        """Wait until a host holding `eid` is marked up (True) or `timeout_s` passed (False)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        self._fetches_waiting += 1
        try:
            for host in self._holders(eid):
                host.wake.set()  # probe now, not at the end of a long backoff
            while not any(h.up for h in self._holders(eid)):
                remaining = end - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._came_up.wait(), remaining)
                except asyncio.TimeoutError:
                    return False
            return True
        finally:
            self._fetches_waiting -= 1

    def _choose(self, eid: ExpertId, exclude: set[_Host]) -> _Host | None:
        """The up replica with the fewest fetches in flight (then the fewest done): spreads load."""
        candidates = [h for h in self._hosts if h.up and eid in h.experts and h not in exclude]
        return min(candidates, key=lambda h: (h.in_flight, h.fetches), default=None)

    async def _fetch_from(self, host: _Host, eid: ExpertId, view: memoryview, tried: dict[_Host, str]) -> bool:
        host.in_flight += 1
        try:
            await host.client.fetch_into(
                eid, view, checksum=self.manifest.experts[eid].checksum, model_id=self.model_id,
                timeout_s=self.settings.fetch_deadline_s, chunk_bytes=self.settings.chunk_bytes,
            )
        except HostError as err:
            tried[host] = str(err)
            self._mark_down(host, err)
            return False
        finally:
            host.in_flight -= 1
        host.fetches += 1
        host.bytes += len(view)
        host.failures = 0
        if not host.up:
            self._mark_up(host, "a fetch from it succeeded")
        return True

    def _unavailable_message(self, eid: ExpertId, tried: dict[_Host, str]) -> str:
        if tried:
            attempts = "; ".join(tried.values())  # each reason names its host
            return f"{eid}: no expert host could deliver it; tried {len(tried)} host(s): {attempts}"
        silent = [h.address for h in self._hosts if not h.experts]
        return f"{eid}: no expert host that answered holds it" + (
            f" (never answered: {', '.join(silent)})" if silent else ""
        )

    # --- running experts on their hosts --------------------------------------------------

    async def run_layer(self, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor, *,
                        timeout_s: float | None = None, tried: dict[_Host, str] | None = None) -> torch.Tensor:
        """sum over n of weights[:, n] * expert_n(hidden), the experts run where they live: hidden
        [T, H] on the CPU (float32, bfloat16 or float16), weights [T, n] -> [T, H] float32.
        `timeout_s` bounds each call (default: the fetch deadline); `tried`: hosts already tried
        for them, and why they failed (not tried again)."""
        timeout_s = self.settings.fetch_deadline_s if timeout_s is None else timeout_s
        column = {expert: n for n, expert in enumerate(experts)}
        total = torch.zeros(hidden.shape, dtype=torch.float32)  # [T, H]
        pending = list(experts)
        tried = {} if tried is None else tried
        while pending:
            groups = self._group_by_host(layer, pending, exclude=set(tried))
            if not groups:
                break
            calls = [self._run_on(host, layer, group, hidden, weights[:, [column[e] for e in group]], timeout_s, tried)
                     for host, group in groups.items()]
            pending = []
            for (host, group), output in zip(groups.items(), await asyncio.gather(*calls)):
                if output is None:
                    pending += group  # to another holder in the next round
                else:
                    total += output
        if pending:
            raise ExpertUnavailableError(self._run_unavailable_message(layer, pending, tried))
        return total

    def start_run_here(self, layer: int, experts: list[int], hidden: torch.Tensor,
                       weights: torch.Tensor) -> "RunsHere | None":
        """run_layer's requests sent from this thread on the hosts' blocking streams, where every
        expert has an up host to go to and each of those hosts takes the request; None where
        not (the caller runs the layer through run_layer on the fetch loop). Any thread, one at
        a time; `finish_run_here` on the same thread gives the sum."""
        groups = self._group_by_host(layer, experts, exclude=set())
        if sum(map(len, groups.values())) != len(experts) or not all(host.up for host in groups):
            return None
        column = {expert: n for n, expert in enumerate(experts)}
        runs = RunsHere(layer, hidden, time.perf_counter())
        for host, group in groups.items():
            columns = weights[:, [column[e] for e in group]]
            try:
                sent = host.client.send_run_blocking(layer, group, hidden, columns, timeout_s=self.settings.fetch_deadline_s,
                                                     model_id=self.model_id)
            except HostError as err:
                runs.failed.append((host, group, columns, err))
                continue
            if sent is None:  # the host's stream is not for this call
                if not runs.sent:
                    return None
                runs.failed.append((host, group, columns, None))
                continue
            runs.sent.append((host, group, columns, sent))  # not counted in host.in_flight: the loop's own to write
        return runs

    def finish_run_here(self, runs: "RunsHere") -> torch.Tensor:
        """The sum [T, H] float32 of what start_run_here sent, waited for on this thread. A
        host that failed is marked down and its experts go to run_layer on the fetch loop
        (replicas, the error it gives where none is left), that host not tried again."""
        total = torch.zeros(runs.hidden.shape, dtype=torch.float32)  # [T, H]
        for host, group, columns, sent in runs.sent:
            try:
                output = host.client.receive_run_blocking(sent)
            except HostError as err:
                runs.failed.append((host, group, columns, err))
                continue
            self._count_run(host, time.perf_counter() - runs.started, runs.hidden, columns, output)
            total += output
        if runs.failed:
            total += self.fetch_loop.submit(self._run_after_failures(runs)).result()
        return total

    async def _run_after_failures(self, runs: "RunsHere") -> torch.Tensor:
        """The failed groups of a RunsHere through run_layer, their hosts marked down first."""
        total = torch.zeros(runs.hidden.shape, dtype=torch.float32)  # [T, H]
        for host, group, columns, err in runs.failed:
            tried = {}
            if err is not None:
                tried[host] = str(err)
                self._mark_down(host, err)
            total += await self.run_layer(runs.layer, group, runs.hidden, columns, tried=tried)
        return total

    def _count_run(self, host: _Host, seconds: float, hidden: torch.Tensor, weights: torch.Tensor,
                   output: torch.Tensor) -> None:
        host.runs += 1
        host.run_seconds += seconds
        host.run_bytes_sent += hidden.numel() * hidden.element_size() + weights.numel() * 4
        host.run_bytes_received += output.numel() * 4
        host.failures = 0

    def _group_by_host(self, layer: int, experts: list[int], exclude: set[_Host]) -> dict[_Host, list[int]]:
        """Each expert to one holder not in `exclude`, up hosts first (a host marked down gets a
        direct try only where no up host holds the expert), as few hosts as cover them: greedily
        the host holding the most of those left, then the one with the least in flight. Experts
        no candidate holds are left out."""
        left = set(experts)
        groups: dict[_Host, list[int]] = {}
        for up in (True, False):
            candidates = [h for h in self._hosts if h.up == up and h not in exclude]
            while left and candidates:
                held = {h: {e for e in left if ExpertId(layer, e) in h.experts} for h in candidates}
                best = max(candidates, key=lambda h: (len(held[h]), -h.in_flight, -h.runs))
                if not held[best]:
                    break
                groups[best] = [e for e in experts if e in held[best]]  # in the caller's order
                left -= held[best]
                candidates.remove(best)
        return groups

    async def _run_on(self, host: _Host, layer: int, experts: list[int], hidden: torch.Tensor, weights: torch.Tensor,
                      timeout_s: float, tried: dict[_Host, str]) -> torch.Tensor | None:
        """The host's weighted sum, or None after marking it down (its reason kept in `tried`)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        host.in_flight += 1
        try:
            output = await host.client.run_experts(layer, experts, hidden, weights, timeout_s=timeout_s,
                                                   model_id=self.model_id)
        except HostError as err:
            tried[host] = str(err)
            self._mark_down(host, err)
            return None
        finally:
            host.in_flight -= 1
        self._count_run(host, loop.time() - started, hidden, weights, output)
        if not host.up:
            self._mark_up(host, "a RunExperts call to it succeeded")
        return output

    def _run_unavailable_message(self, layer: int, experts: list[int], tried: dict[_Host, str]) -> str:
        named = describe_experts(sorted(ExpertId(layer, e) for e in experts))
        if tried:
            return f"{named}: no expert host could run them; tried {len(tried)} host(s): " + "; ".join(tried.values())
        return f"{named}: no expert host that answered holds them"

    # --- host health ---------------------------------------------------------------------

    def _mark_down(self, host: _Host, err: Exception) -> None:
        if host.up:
            log.warning("expert host %s marked down: %s", host.address, err)
        host.up = False
        host.failures += 1
        host.last_error = str(err)
        host.may_come_back = isinstance(err, HostCallError) and err.may_come_back
        if host.prober is None or host.prober.done():
            host.prober = asyncio.get_running_loop().create_task(self._probe_until_up(host))

    def _mark_up(self, host: _Host, why: str) -> None:
        host.up = True
        host.loading = False
        self._came_up.set()  # wakes the fetches waiting for a host; later waits use a fresh event
        self._came_up = asyncio.Event()
        log.info("expert host %s is up again (%s)", host.address, why)
        if host.prober is not None and host.prober is not asyncio.current_task():
            host.prober.cancel()
        host.prober = None

    def _backoff_s(self, host: _Host) -> float:
        doublings = min(max(host.failures - 1, 0), 30)
        return min(self.settings.probe_max_s, self.settings.probe_min_s * 2**doublings)

    async def _probe_until_up(self, host: _Host) -> None:
        while not host.up:
            await self._sleep_before_probe(host)
            try:
                if not await host.client.serving(timeout_s=self.settings.info_deadline_s):
                    if not host.loading:
                        log.info("expert host %s is back and loading its shard; waiting for SERVING", host.address)
                    host.loading = host.may_come_back = True
                    host.last_error = f"{host.address}: still loading its shard (its health check says NOT_SERVING)"
                    continue
                info = await host.client.info(timeout_s=self.settings.info_deadline_s)
                self._check_same_store(host, info)
            except HostError as err:
                host.failures += 1
                host.last_error = str(err)
                host.loading = False
                host.may_come_back = isinstance(err, HostCallError) and err.may_come_back
                log.debug("expert host %s still down: %s", host.address, err)
                continue
            self._accept(host, info)
            self._mark_up(host, "it answered Info")

    async def _sleep_before_probe(self, host: _Host) -> None:
        """The backoff, cut short by `host.wake`; the shortest interval while the host loads or
        a fetch waits for a host to come back."""
        delay = self.settings.probe_min_s if host.loading or self._fetches_waiting else self._backoff_s(host)
        try:
            await asyncio.wait_for(host.wake.wait(), delay)
        except asyncio.TimeoutError:
            pass
        finally:
            host.wake.clear()

    # --- stats and closing ---------------------------------------------------------------

    def bytes_by_origin(self) -> dict[str, int]:
        return {host.address: host.bytes for host in self._hosts}

    def fetches_by_origin(self) -> dict[str, int]:
        return {host.address: host.fetches for host in self._hosts}

    def run_seconds_by_origin(self) -> dict[str, float]:
        """Seconds spent waiting for successful RunExperts calls, per host address."""
        return {host.address: host.run_seconds for host in self._hosts}

    def run_compute_seconds_by_origin(self) -> dict[str, float]:
        """Of run_seconds_by_origin, what each host reported spending on its CPU (RunExpertsReply.compute_s)."""
        return {host.address: host.client.run_compute_seconds for host in self._hosts}

    def run_bytes_by_origin(self) -> dict[str, tuple[int, int]]:
        """(bytes sent, bytes received) in successful RunExperts calls, per host address."""
        return {host.address: (host.run_bytes_sent, host.run_bytes_received) for host in self._hosts}

    def runs_by_origin(self) -> dict[str, int]:
        return {host.address: host.runs for host in self._hosts}

    def host_status(self) -> dict[str, bool]:
        """Up (True) or marked down (False), per host address; safe to read from any thread."""
        return {host.address: host.up for host in self._hosts}

    def close(self) -> None:
        if not self._hosts:
            return
        hosts, self._hosts = self._hosts, []

        async def close_all() -> None:
            for host in hosts:
                if host.prober is not None:
                    host.prober.cancel()
            await asyncio.gather(*(host.client.close() for host in hosts), return_exceptions=True)

        try:
            self.fetch_loop.run(close_all(), timeout=5.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # the loop is gone already: nothing left to close on it


def describe_experts(experts: list[ExpertId]) -> str:
    """`layer 0 experts 3-5; layer 2 experts 0,7` for a sorted list of experts."""
    by_layer: dict[int, list[int]] = {}
    for eid in experts:
        by_layer.setdefault(eid.layer, []).append(eid.expert)
    return "; ".join(f"layer {layer} experts {_ranges(indices)}" for layer, indices in by_layer.items())


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": the form --layers and --experts take."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)
