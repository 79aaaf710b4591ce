"""An expert host answers good requests with the store's bytes and bad ones with a clear gRPC
status, and keeps serving; the coordinator refuses hosts of another store and names what no
host holds. Real `python -m expert_host serve` processes on 127.0.0.1."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import ConfigError, HostError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.rpc import expert_host_pb2 as pb
from common.rpc import expert_host_pb2_grpc as pb_grpc
from common.store.checksum import blob_checksum
from common.store.manifest import FORMAT_VERSION
from common.store.reader import ExpertStore
from conftest import expert_host_cli
from coordinator.runtime.fetch_loop import FetchLoop
from coordinator.sources.cluster_config import ClusterConfig
from coordinator.sources.expert_pool import ExpertPool
from expert_host.server import check_listen_allowed
from expert_host_processes import expert_hosts, module_expert_hosts  # noqa: F401  (fixtures)

HELD_EXPERTS = "0-5"  # of 8: experts 6 and 7 of every layer are not held


@pytest.fixture(scope="module")
def partial_host(module_expert_hosts, store16):  # noqa: F811
    return module_expert_hosts.start(store16, "--experts", HELD_EXPERTS)


@pytest.fixture(scope="module")
def stub(partial_host):
    with grpc.insecure_channel(partial_host.address) as channel:
        yield pb_grpc.ExpertHostStub(channel)


def fetch(stub, layer, expert, **fields):
    """The generated client's view of FetchExpert: (chunks, whole blob)."""
    chunks = list(stub.FetchExpert(pb.FetchExpertRequest(id=pb.ExpertId(layer=layer, expert=expert), **fields), timeout=10))
    return chunks, b"".join(chunk.data for chunk in chunks)


def test_info_reports_format_store_held_experts_ram_and_bandwidth(stub, store16):
    store = ExpertStore(store16)
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert info.format_version == FORMAT_VERSION
    assert info.model_id == store.manifest.model_id
    held = {ExpertId(e.layer, e.expert) for e in info.experts}
    assert held == {ExpertId(layer, expert) for layer in range(4) for expert in range(6)}
    assert info.blob_nbytes == store.blob_nbytes
    assert info.ram_bytes == len(held) * store.blob_nbytes
    assert info.memory_gbps > 0
    assert info.can_run_experts and info.expert_ms > 0


def test_fetched_chunks_rebuild_the_store_blob_with_its_checksum_first(stub, store16):
    store = ExpertStore(store16)
    eid = ExpertId(2, 5)
    chunks, blob = fetch(stub, eid.layer, eid.expert, chunk_bytes=64 << 10)
    assert len(chunks) > 1  # really streamed in chunks
    assert chunks[0].checksum == store.checksum_of(eid) and chunks[0].total_bytes == store.blob_nbytes
    assert [c.offset for c in chunks] == list(range(0, store.blob_nbytes, 64 << 10))
    assert blob == bytes(store.expert_blob(eid).numpy())
    assert blob_checksum(blob) == store.checksum_of(eid)


@pytest.mark.parametrize("request_fields,code,words", [
    (dict(id=pb.ExpertId(layer=-1, expert=0)), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    (dict(id=pb.ExpertId(layer=0, expert=-3)), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    (dict(id=pb.ExpertId(layer=4, expert=0)), grpc.StatusCode.INVALID_ARGUMENT, "layers 0-3"),
    (dict(id=pb.ExpertId(layer=0, expert=8)), grpc.StatusCode.INVALID_ARGUMENT, "experts 0-7"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "names no expert"),
    (dict(id=pb.ExpertId(layer=1, expert=7)), grpc.StatusCode.NOT_FOUND, "layer 1 expert 7: not held"),
    (dict(id=pb.ExpertId(layer=1, expert=1), model_id="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION, "0123456789abcdef"),
    (dict(id=pb.ExpertId(layer=1, expert=1), chunk_bytes=1 << 30), grpc.StatusCode.INVALID_ARGUMENT, "chunk_bytes"),
])
def test_bad_requests_get_a_clear_status_and_the_host_keeps_serving(stub, store16, request_fields, code, words):
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.FetchExpert(pb.FetchExpertRequest(**request_fields), timeout=10))
    assert refused.value.code() == code
    assert words in refused.value.details()
    _, blob = fetch(stub, 0, 0)
    assert blob_checksum(blob) == ExpertStore(store16).checksum_of(ExpertId(0, 0))


def test_run_experts_is_served_and_refuses_an_expert_not_held_naming_it(stub):
    hidden = bytes(4 * 128)  # one token of float32 zeros
    reply = stub.RunExperts(pb.RunExpertsRequest(layer=1, experts=[0], dtype="float32", shape=[1, 128], hidden=hidden,
                                                 weights=bytes(4)), timeout=10)
    assert list(reply.shape) == [1, 128] and len(reply.output) == 4 * 128
    with pytest.raises(grpc.RpcError) as refused:
        stub.RunExperts(pb.RunExpertsRequest(layer=1, experts=[0, 7], dtype="float32", shape=[1, 128], hidden=hidden,
                                             weights=bytes(8)), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "layer 1 expert 7: not held" in refused.value.details()


def test_health_service_says_serving(partial_host):
    with grpc.insecure_channel(partial_host.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def open_pool(store, *addresses):
    loop = FetchLoop()
    cluster = ClusterConfig(hosts=tuple(HostAddress.parse(a) for a in addresses))
    try:
        return ExpertPool.open(cluster, ExpertStore(store, with_experts=False).manifest, loop), loop
    except BaseException:
        loop.close()
        raise


def test_coordinator_names_the_experts_no_host_holds(partial_host, store16):
    with pytest.raises(HostError) as refused:
        open_pool(store16, partial_host.address)
    message = str(refused.value)
    assert "8 of the model's 32 experts" in message
    assert "layer 0 experts 6-7" in message and "layer 3 experts 6-7" in message


def test_coordinator_refuses_a_host_of_another_store_naming_it(partial_host, store4):
    with pytest.raises(HostError) as refused:
        open_pool(store4, partial_host.address)
    assert partial_host.address in str(refused.value) and "another store" in str(refused.value)


def test_sigterm_stops_a_host_gracefully(expert_hosts, store4):
    host = expert_hosts.start(store4)
    assert host.stop() == 0
    assert "stopped" in host.log()


def test_a_host_refuses_a_lan_address_without_tls_or_token(store4):
    done = expert_host_cli("serve", "--store", store4, "--listen", "0.0.0.0:0")
    assert done.returncode == ConfigError.exit_code
    assert done.stderr.strip().splitlines()[-1].startswith("error: --listen 0.0.0.0:0: other machines can reach")


def test_a_host_refuses_a_thread_count_below_one(store4):
    done = expert_host_cli("serve", "--store", store4, "--threads", "0")
    assert done.returncode == ConfigError.exit_code
    assert done.stderr.strip().splitlines()[-1] == "error: --threads 0: give at least 1"


@pytest.mark.parametrize("listen,tls,token,insecure,allowed", [
    ("127.0.0.1:0", False, False, False, True),
    ("[::1]:50051", False, False, False, True),
    ("localhost:50051", False, False, False, True),
    ("unix:/tmp/x.sock", False, False, False, True),
    ("0.0.0.0:50051", False, False, False, False),
    ("192.168.1.20:50051", False, False, False, False),
    ("ram-pc:50051", False, False, False, False),
    ("0.0.0.0:50051", True, False, False, True),
    ("0.0.0.0:50051", False, True, False, True),
    ("0.0.0.0:50051", False, False, True, True),
])
def test_listen_policy_wants_tls_or_a_token_beyond_loopback(listen, tls, token, insecure, allowed):
    address = HostAddress.parse(listen, allow_any_port=True)
    if allowed:
        check_listen_allowed(address, tls=tls, token=token, insecure=insecure)
    else:
        with pytest.raises(ConfigError, match="--insecure"):
            check_listen_allowed(address, tls=tls, token=token, insecure=insecure)


def test_a_second_host_on_a_taken_address_fails_instead_of_sharing_it(partial_host, store16):
    done = expert_host_cli("serve", "--store", store16, "--listen", partial_host.address)
    assert done.returncode == ConfigError.exit_code
    assert f"error: --listen {partial_host.address}: cannot listen there" in done.stderr
