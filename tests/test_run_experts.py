"""RunExperts: a host runs a layer's chosen experts where they live and returns their weighted
sum, the same sum the CPU executor gives here on the same blobs; ExpertPool.run_layer makes one
call per host, sums the replies and moves a dead host's experts to a replica; a bad request gets
a status naming the problem and the host keeps serving. Real hosts on 127.0.0.1."""

import grpc
import pytest
import torch

from common.cpu_executor import CpuExpert, run_experts
from common.errors import ExpertUnavailableError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.rpc import expert_host_pb2 as pb
from common.rpc import expert_host_pb2_grpc as pb_grpc
from common.rpc.wire_limits import MAX_RUN_EXPERTS_BYTES
from common.store.reader import ExpertStore
from coordinator.runtime.fetch_loop import FetchLoop
from coordinator.sources.cluster_config import ClusterConfig, PoolSettings
from coordinator.sources.expert_pool import ExpertPool
from expert_host_processes import expert_hosts, module_expert_hosts  # noqa: F401  (fixtures)

HIDDEN = 128  # the tiny Mixtral's hidden size
LAYER, EXPERTS = 2, [1, 6, 3]  # experts of both halves, in no particular order
SETTINGS = PoolSettings(fetch_deadline_s=10, info_deadline_s=2, probe_min_s=0.2, probe_max_s=1, host_restart_wait_s=0)


def step(tokens: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [T, H] and routing weights [T, n], a token's unchosen experts at 0."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=generator).to(dtype)
    weights = torch.rand(tokens, len(EXPERTS), generator=generator)
    weights[0, 1] = 0.0
    return hidden, weights


def local_sum(store, hidden, weights, layer=LAYER, experts=EXPERTS):
    opened = ExpertStore(store)
    cpu_experts = [CpuExpert(opened.layout.views(opened.expert_blob(ExpertId(layer, e))), dtype=hidden.dtype)
                   for e in experts]
    return run_experts(hidden, cpu_experts, weights)


class Pool:
    """An ExpertPool on its own fetch loop, closed with it."""

    def __init__(self, store, *hosts, settings=SETTINGS):
        self.loop = FetchLoop()
        cluster = ClusterConfig(hosts=tuple(HostAddress.parse(h.address) for h in hosts), pool=settings)
        self.pool = ExpertPool.open(cluster, ExpertStore(store, with_experts=False).manifest, self.loop)

    def run_layer(self, hidden, weights, layer=LAYER, experts=EXPERTS, **kwargs):
        return self.loop.run(self.pool.run_layer(layer, experts, hidden, weights, **kwargs), timeout=60)

    def streams_open(self) -> dict[str, bool]:
        return {host.address: host.client.run_stream_open for host in self.pool._hosts}

    def close(self):
        self.pool.close()
        self.loop.close()


def calls_answered(host) -> int:
    with grpc.insecure_channel(host.address) as channel:
        return pb_grpc.ExpertHostStub(channel).Info(pb.InfoRequest(), timeout=10).run_experts_calls


@pytest.fixture(scope="module")
def halves(module_expert_hosts, store16):  # noqa: F811
    """Two hosts of store16: experts 0-3 and 4-7 of every layer."""
    return module_expert_hosts.start_many([(store16, "--experts", "0-3"), (store16, "--experts", "4-7")])


@pytest.fixture(scope="module")
def store4_host(module_expert_hosts, store4):  # noqa: F811
    return module_expert_hosts.start(store4, "--mmap")  # blobs read per use: the runner keeps its repacked copy


@pytest.mark.parametrize("store_name,host_name,dtype,tokens", [
    ("store16", "shared_store16_host", torch.float32, 1), ("store16", "shared_store16_host", torch.float32, 5),
    ("store4", "store4_host", torch.bfloat16, 1), ("store4", "store4_host", torch.bfloat16, 5),
])
def test_one_host_returns_the_weighted_sum_the_cpu_executor_gives_here(request, store_name, host_name, dtype, tokens):
    store, host = request.getfixturevalue(store_name), request.getfixturevalue(host_name)
    hidden, weights = step(tokens, dtype)
    pool = Pool(store, host)
    try:
        remote = pool.run_layer(hidden, weights)
    finally:
        pool.close()
    expected = local_sum(store, hidden, weights)
    assert remote.dtype == torch.float32 and remote.shape == (tokens, HIDDEN)
    if dtype == torch.float32:
        assert torch.allclose(remote, expected, atol=1e-5, rtol=0)
    else:
        assert ((remote - expected).norm() / expected.norm()).item() < 2e-2


def test_split_over_two_hosts_the_pool_makes_one_call_per_host_and_sums_them(halves, store16):
    hidden, weights = step(4, torch.float32, seed=1)
    before = [calls_answered(host) for host in halves]
    pool = Pool(store16, *halves)
    try:
        remote = pool.run_layer(hidden, weights)
        runs = pool.pool.runs_by_origin()
        sent_received = pool.pool.run_bytes_by_origin()
        seconds = pool.pool.run_seconds_by_origin()
        computing = pool.pool.run_compute_seconds_by_origin()
    finally:
        pool.close()
    assert torch.allclose(remote, local_sum(store16, hidden, weights), atol=1e-5, rtol=0)
    assert [calls_answered(host) - b for host, b in zip(halves, before)] == [1, 1]  # counted by the hosts themselves
    low, high = halves
    assert runs == {low.address: 1, high.address: 1}
    # experts 1, 3 on the low half, 6 on the high: hidden [4, 128] float32 plus their weight columns out, [4, 128] back
    assert sent_received[low.address] == (4 * HIDDEN * 4 + 4 * 2 * 4, 4 * HIDDEN * 4)
    assert sent_received[high.address] == (4 * HIDDEN * 4 + 4 * 1 * 4, 4 * HIDDEN * 4)
    assert all(seconds[h.address] > 0 for h in halves)
    assert all(0 < computing[h.address] < seconds[h.address] for h in halves)  # the hosts' own share of the wait


def test_a_host_killed_between_calls_moves_its_experts_to_the_replica(expert_hosts, store16):  # noqa: F811
    first, second = expert_hosts.start_many([(store16,), (store16,)])
    hidden, weights = step(3, torch.float32, seed=2)
    expected = local_sum(store16, hidden, weights)
    pool = Pool(store16, first, second)
    try:
        assert torch.allclose(pool.run_layer(hidden, weights), expected, atol=1e-5, rtol=0)
        # the next call goes to the host that has run fewer (load spreads): kill that one
        idle = next(address for address, runs in pool.pool.runs_by_origin().items() if runs == 0)
        victim, replica = (first, second) if idle == first.address else (second, first)
        victim.kill()
        assert torch.allclose(pool.run_layer(hidden, weights), expected, atol=1e-5, rtol=0)
        assert pool.pool.host_status() == {victim.address: False, replica.address: True}
        replica.kill()
        with pytest.raises(ExpertUnavailableError) as unavailable:
            pool.run_layer(hidden, weights)
    finally:
        pool.close()
    message = str(unavailable.value)
    assert f"layer {LAYER} experts 1,3,6" in message and replica.address in message and victim.address in message


def good_request(**changes):
    hidden, weights = step(2, torch.float32)
    fields = dict(layer=LAYER, experts=[1, 3], dtype="float32", shape=[2, HIDDEN],
                  hidden=hidden.numpy().tobytes(), weights=weights[:, :2].contiguous().numpy().tobytes())
    return pb.RunExpertsRequest(**{**fields, **changes})


@pytest.mark.parametrize("changes,code,words", [
    (dict(experts=[1, 5]), grpc.StatusCode.NOT_FOUND, "layer 2 expert 5: not held"),
    (dict(layer=4), grpc.StatusCode.INVALID_ARGUMENT, "layer 4: the model has layers 0-3"),
    (dict(layer=-1), grpc.StatusCode.INVALID_ARGUMENT, "layer -1"),
    (dict(experts=[1, 8]), grpc.StatusCode.INVALID_ARGUMENT, "expert 8: the model has experts 0-7"),
    (dict(experts=[]), grpc.StatusCode.INVALID_ARGUMENT, "names no expert"),
    (dict(experts=[1, 1]), grpc.StatusCode.INVALID_ARGUMENT, "twice"),
    (dict(hidden=bytes(10)), grpc.StatusCode.INVALID_ARGUMENT, "field hidden"),
    (dict(shape=[4, 64], hidden=bytes(4 * 64 * 4)), grpc.StatusCode.INVALID_ARGUMENT, "want [T, 128]"),
    (dict(shape=[2]), grpc.StatusCode.INVALID_ARGUMENT, "field shape"),
    (dict(weights=bytes(12)), grpc.StatusCode.INVALID_ARGUMENT, "field weights"),
    (dict(dtype="int8"), grpc.StatusCode.INVALID_ARGUMENT, "dtype 'int8'"),
    (dict(dtype=""), grpc.StatusCode.INVALID_ARGUMENT, "field dtype"),
    (dict(model_id="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION, "0123456789abcdef"),
])
def test_bad_run_requests_get_a_status_naming_the_problem_and_the_host_keeps_serving(halves, changes, code, words):
    low, _ = halves
    with grpc.insecure_channel(low.address) as channel:
        stub = pb_grpc.ExpertHostStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RunExperts(good_request(**changes), timeout=10)
        assert refused.value.code() == code
        assert words in refused.value.details()
        assert stub.Info(pb.InfoRequest(), timeout=10).can_run_experts
        assert list(stub.RunExperts(good_request(), timeout=10).shape) == [2, HIDDEN]


def test_an_oversize_run_request_is_refused_before_it_is_read(halves):
    low, _ = halves
    tokens = MAX_RUN_EXPERTS_BYTES // (HIDDEN * 4) + 1
    oversize = good_request(shape=[tokens, HIDDEN], hidden=bytes(tokens * HIDDEN * 4), weights=bytes(tokens * 2 * 4))
    options = [("grpc.max_send_message_length", 2 * MAX_RUN_EXPERTS_BYTES)]  # past our own client's limit
    with grpc.insecure_channel(low.address, options=options) as channel:
        stub = pb_grpc.ExpertHostStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RunExperts(oversize, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(stub.RunExperts(good_request(), timeout=10).shape) == [2, HIDDEN]
