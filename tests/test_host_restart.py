"""A host that restarts costs no generation, against real hosts on 127.0.0.1: the only host
holding the experts SIGKILLed mid-generation and started again on its address changes no token;
one that never comes back fails within the wait limit, naming the expert and the host; with a
replica up failover does not wait. A host says NOT_SERVING on grpc.health.v1 while it loads,
SERVING once ready (a pool opened meanwhile waits for it), and stops cleanly on SIGTERM even then."""

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from common.errors import ConfigError, ExpertUnavailableError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.rpc import expert_host_pb2 as pb
from common.rpc import expert_host_pb2_grpc as pb_grpc
from common.rpc.wire_limits import MIN_CHUNK_BYTES
from common.store.reader import ExpertStore
from conftest import ROOT
from coordinator.cli.engine_args import _cluster_from_args, add_source_arguments, source_from_args
from coordinator.runtime.engine import Engine
from coordinator.runtime.fetch_loop import FetchLoop
from coordinator.sources.cluster_config import ClusterConfig, PoolSettings, read_cluster_config
from coordinator.sources.expert_pool import ExpertPool
from expert_host_processes import expert_hosts  # noqa: F401  (fixture)
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROMPT = "A small cache on the graphics card keeps the experts"
SERVICE = pb.DESCRIPTOR.services_by_name["ExpertHost"].full_name


def settings(host_restart_wait_s):
    return PoolSettings(fetch_deadline_s=5, info_deadline_s=2, probe_min_s=0.2, probe_max_s=1,
                        chunk_bytes=MIN_CHUNK_BYTES, host_restart_wait_s=host_restart_wait_s)


def pool_source(hosts, host_restart_wait_s):
    cluster = ClusterConfig(hosts=tuple(HostAddress.parse(h.address) for h in hosts), pool=settings(host_restart_wait_s))
    return ExpertPool.source_factory(cluster)


def run(engine, on_token=None):
    generation = engine.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
    for count, _ in enumerate(generation, 1):
        if on_token is not None:
            on_token(count)
    return generation


@pytest.fixture(scope="module")
def reference(store16):
    with Engine.open(store16, source="ram", cache_experts=1) as engine:
        return run(engine).token_ids


def test_the_only_host_restarted_mid_generation_changes_no_token(expert_hosts, store16, reference):  # noqa: F811
    host = expert_hosts.start(store16)
    restarted = []

    def restart():  # on the same address, loading slowly: the pool must wait for SERVING
        time.sleep(0.5)
        restarted.append(expert_hosts.start(store16, "--test-load-delay", "1", listen=host.address))

    restarter = threading.Thread(target=restart, daemon=True)
    with Engine.open(store16, source=pool_source([host], host_restart_wait_s=60), cache_experts=1) as engine:
        fetched_before_kill = {}

        def kill_after_four_tokens(count):
            if count == 4:
                fetched_before_kill.update(engine.source.fetches_by_origin())
                host.kill()
                restarter.start()

        generation = run(engine, on_token=kill_after_four_tokens)
        restarter.join(60)
        assert generation.token_ids == reference
        assert generation.finish_reason == "length"
        assert restarted and restarted[0].address == host.address
        assert engine.source.fetches_by_origin()[host.address] > fetched_before_kill[host.address]  # served again
        assert engine.source.host_status() == {host.address: True}


def test_a_host_that_never_comes_back_fails_within_the_wait_limit_naming_expert_and_host(expert_hosts, store16):  # noqa: F811
    host = expert_hosts.start(store16)
    with Engine.open(store16, source=pool_source([host], host_restart_wait_s=1), cache_experts=1) as engine:
        host.kill()
        started = time.monotonic()
        with pytest.raises(ExpertUnavailableError) as failed:
            run(engine)
        assert time.monotonic() - started < 15
    message = str(failed.value)
    assert "no expert host could deliver it" in message and host.address in message
    assert message.startswith("layer ") and " expert " in message.split(":")[0], message


def test_with_a_replica_up_failover_does_not_wait_for_the_dead_host(expert_hosts, store16, reference):  # noqa: F811
    a, b = expert_hosts.start_many([(store16,), (store16,)])
    with Engine.open(store16, source=pool_source([a, b], host_restart_wait_s=60), cache_experts=1) as engine:
        started = time.monotonic()
        generation = run(engine, on_token=lambda count: a.kill() if count == 4 else None)
        elapsed = time.monotonic() - started
        assert generation.token_ids == reference
        assert engine.source.host_status() == {a.address: False, b.address: True}
    assert elapsed < 30  # a wait for A would take the whole 60 s


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def slow_loading_host(store16, tmp_path):
    """A host on a known port that sleeps 4 s before loading; killed at the end."""
    address = f"127.0.0.1:{free_port()}"
    address_file = tmp_path / "host.address"
    log = open(tmp_path / "host.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "expert_host", "serve", "--store", str(store16), "--listen", address,
                                "--address-file", str(address_file), "--grace-period", "1", "--test-load-delay", "4"],
                               cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    yield process, address, address_file
    if process.poll() is None:
        process.kill()
    process.wait(10)
    log.close()


def health_status(channel):
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1).status
    except grpc.RpcError:
        return None  # not listening yet


def wait_for_status(channel, process, wanted, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while (status := health_status(channel)) != wanted:
        assert process.poll() is None, f"the host exited with {process.returncode}"
        assert time.monotonic() < deadline, f"health still {status}, not {wanted}"
        time.sleep(0.05)


def test_health_says_not_serving_while_the_shard_loads_then_serving(slow_loading_host):
    process, address, address_file = slow_loading_host
    with grpc.insecure_channel(address) as channel:
        wait_for_status(channel, process, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not address_file.exists()  # written once serving
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ExpertHostStub(channel).Info(pb.InfoRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "still loading its shard" in refused.value.details()
        wait_for_status(channel, process, health_pb2.HealthCheckResponse.SERVING)
        assert address_file.read_text().strip() == address
        assert pb_grpc.ExpertHostStub(channel).Info(pb.InfoRequest(), timeout=5).experts


def test_the_pool_opens_once_a_host_still_loading_says_serving(slow_loading_host, store16):
    process, address, _ = slow_loading_host
    with grpc.insecure_channel(address) as channel:
        wait_for_status(channel, process, health_pb2.HealthCheckResponse.NOT_SERVING)
    store = ExpertStore(store16)
    loop = FetchLoop()
    try:
        cluster = ClusterConfig(hosts=(HostAddress.parse(address),), pool=settings(host_restart_wait_s=60))
        pool = ExpertPool.open(cluster, store.manifest, loop)
        try:
            out = torch.empty(store.blob_nbytes, dtype=torch.uint8)
            loop.run(pool.fetch_into(ExpertId(1, 2), out), timeout=30)
            assert torch.equal(out, store.expert_blob(ExpertId(1, 2)))
        finally:
            pool.close()
    finally:
        loop.close()


def test_sigterm_while_loading_stops_the_host_gracefully(slow_loading_host):
    process, address, address_file = slow_loading_host
    with grpc.insecure_channel(address) as channel:
        wait_for_status(channel, process, health_pb2.HealthCheckResponse.NOT_SERVING)
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0  # our handler, not the default action (which would give -15)
    assert not address_file.exists()


def source_args(*argv):
    parser = argparse.ArgumentParser()
    add_source_arguments(parser)
    return parser.parse_args(list(argv))


def test_host_restart_wait_comes_from_the_flag_or_cluster_toml(tmp_path):
    cluster = _cluster_from_args(source_args("--hosts", "127.0.0.1:1", "--host-restart-wait", "5"), None)
    assert cluster.pool.host_restart_wait_s == 5
    assert _cluster_from_args(source_args("--hosts", "127.0.0.1:1"), None).pool.host_restart_wait_s == 60
    toml = tmp_path / "cluster.toml"
    toml.write_text('[pool]\nhost_restart_wait_s = 0\n[[hosts]]\naddress = "127.0.0.1:1"\n')
    assert read_cluster_config(toml).pool.host_restart_wait_s == 0


def test_a_negative_host_restart_wait_or_one_without_hosts_is_refused():
    with pytest.raises(ConfigError, match="host_restart_wait_s = -1.0: must not be negative"):
        _cluster_from_args(source_args("--hosts", "127.0.0.1:1", "--host-restart-wait", "-1"), None)
    with pytest.raises(ConfigError, match="--host-restart-wait applies to expert hosts"):
        source_from_args(source_args("--host-restart-wait", "5"))


def test_run_experts_unary_comes_from_the_flag_or_cluster_toml_and_a_wrong_value_is_refused(tmp_path):
    assert _cluster_from_args(source_args("--hosts", "127.0.0.1:1"), None).pool.run_experts == "stream"
    cluster = _cluster_from_args(source_args("--hosts", "127.0.0.1:1", "--run-experts", "unary"), None)
    assert cluster.pool.run_experts == "unary"
    toml = tmp_path / "cluster.toml"
    toml.write_text('[pool]\nrun_experts = "unary"\n[[hosts]]\naddress = "127.0.0.1:1"\n')
    assert read_cluster_config(toml).pool.run_experts == "unary"
    toml.write_text('[pool]\nrun_experts = "rpc"\n[[hosts]]\naddress = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="run_experts = 'rpc': choose stream or unary"):
        read_cluster_config(toml)
    toml.write_text('[pool]\nrun_experts = 1\n[[hosts]]\naddress = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r"\[pool\] run_experts must be a string"):
        read_cluster_config(toml)
    with pytest.raises(ConfigError, match="--run-experts applies to expert hosts"):
        source_from_args(source_args("--run-experts", "unary"))
