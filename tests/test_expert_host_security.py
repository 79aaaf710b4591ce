"""Token and TLS: a wrong or missing token is UNAUTHENTICATED; TLS with a self-signed CA made
here works, optionally mutual; a plaintext client against a TLS host fails with a message that
says so. Real hosts on 127.0.0.1."""

import shutil
import subprocess

import grpc
import pytest
import torch

from common.errors import ConfigError, HostError
from common.expert_id import ExpertId
from common.host_address import HostAddress
from common.rpc import expert_host_pb2 as pb
from common.rpc import expert_host_pb2_grpc as pb_grpc
from common.store.reader import ExpertStore
from coordinator.runtime.fetch_loop import FetchLoop
from coordinator.sources.cluster_config import ClientTls, ClusterConfig
from coordinator.sources.expert_pool import ExpertPool
from conftest import ROOT
from expert_host_processes import expert_hosts, module_expert_hosts  # noqa: F401  (fixtures)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from self_signed_certificates import SelfSignedCA

TOKEN = "3f1c0d8e9a7b6c5d4e3f2a1b0c9d8e7f"


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secrets")
    ca = SelfSignedCA(folder)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    wrong_token_file = folder / "wrong-token"
    wrong_token_file.write_text("0" * 32)
    return dict(ca=ca, server=ca.issue("expert-host", server=True), client=ca.issue("coordinator", server=False),
                token=token_file, wrong_token=wrong_token_file, other_ca=SelfSignedCA(folder, "another CA"))


@pytest.fixture(scope="module")
def hosts(module_expert_hosts, store4, secrets):  # noqa: F811
    server = secrets["server"]
    tls_token, mutual = module_expert_hosts.start_many([
        (store4, "--tls-cert", server.cert, "--tls-key", server.key, "--token-file", secrets["token"]),
        (store4, "--tls-cert", server.cert, "--tls-key", server.key, "--tls-client-ca", secrets["ca"].files.cert),
    ])
    return dict(tls_token=tls_token.address, mutual=mutual.address)


def tls_channel(address, secrets, *, client_cert=False):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=secrets["ca"].files.cert.read_bytes(),
        private_key=secrets["client"].key.read_bytes() if client_cert else None,
        certificate_chain=secrets["client"].cert.read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(address, credentials)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer " + "0" * 32),), (("authorization", TOKEN),)],
                         ids=["missing", "wrong", "not-bearer"])
def test_a_missing_or_wrong_token_is_unauthenticated(hosts, secrets, metadata):
    with tls_channel(hosts["tls_token"], secrets) as channel:
        stub = pb_grpc.ExpertHostStub(channel)
        for call in (lambda: stub.Info(pb.InfoRequest(), timeout=10, metadata=metadata),
                     lambda: list(stub.FetchExpert(pb.FetchExpertRequest(id=pb.ExpertId(layer=0, expert=0)),
                                                   timeout=10, metadata=metadata)),
                     lambda: list(stub.RunExpertsStream(iter([pb.RunExpertsRequest(layer=0, experts=[0])]),
                                                        timeout=10, metadata=metadata))):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in refused.value.details()
        # the right token passes; the health check needs none
        assert stub.Info(pb.InfoRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)).model_id
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def open_pool(store, address, **cluster):
    loop = FetchLoop()
    try:
        pool = ExpertPool.open(ClusterConfig(hosts=(HostAddress.parse(address),), **cluster),
                               ExpertStore(store, with_experts=False).manifest, loop)
    except BaseException:
        loop.close()
        raise
    return pool, loop


def fetch_one(pool, loop, store):
    eid = ExpertId(3, 1)
    out = torch.empty(pool.blob_nbytes, dtype=torch.uint8)
    loop.run(pool.fetch_into(eid, out), timeout=30)
    assert torch.equal(out, ExpertStore(store).expert_blob(eid))


def test_tls_with_a_self_signed_ca_and_the_token_works(hosts, secrets, store4):
    pool, loop = open_pool(store4, hosts["tls_token"], tls=ClientTls(ca=secrets["ca"].files.cert), token_file=secrets["token"])
    try:
        fetch_one(pool, loop, store4)
        hidden, weights = torch.randn(1, 128).to(torch.bfloat16), torch.ones(1, 2)  # the tiny Mixtral's hidden size
        assert loop.run(pool.run_layer(0, [0, 1], hidden, weights), timeout=30).shape == (1, 128)  # on its stream
        assert pool._hosts[0].client.run_stream_open
        here = pool.finish_run_here(pool.start_run_here(0, [0, 1], hidden, weights))  # from this thread: TLS and token too
        assert here.shape == (1, 128) and pool._hosts[0].client.blocking_run_stream_open
    finally:
        pool.close()
        loop.close()


def test_the_pool_reports_a_refused_token_naming_the_host(hosts, secrets, store4):
    with pytest.raises(HostError) as refused:
        open_pool(store4, hosts["tls_token"], tls=ClientTls(ca=secrets["ca"].files.cert), token_file=secrets["wrong_token"])
    assert hosts["tls_token"] in str(refused.value) and "refused our token" in str(refused.value)


def test_plaintext_against_a_tls_host_fails_with_a_clear_message(hosts, secrets, store4):
    with pytest.raises(HostError) as refused:
        open_pool(store4, hosts["tls_token"], token_file=secrets["token"])
    message = str(refused.value)
    assert hosts["tls_token"] in message and "unreachable" in message and "serves TLS" in message and "give its CA (--tls-ca" in message


def test_a_host_certificate_from_another_ca_is_refused(hosts, secrets, store4):
    with pytest.raises(HostError) as refused:
        open_pool(store4, hosts["tls_token"], tls=ClientTls(ca=secrets["other_ca"].files.cert), token_file=secrets["token"])
    assert "signed by our CA" in str(refused.value)


def test_mutual_tls_wants_a_client_certificate_signed_by_the_ca(hosts, secrets, store4):
    with pytest.raises(HostError):
        open_pool(store4, hosts["mutual"], tls=ClientTls(ca=secrets["ca"].files.cert))
    client = secrets["client"]
    pool, loop = open_pool(store4, hosts["mutual"], tls=ClientTls(ca=secrets["ca"].files.cert, cert=client.cert, key=client.key))
    try:
        fetch_one(pool, loop, store4)
    finally:
        pool.close()
        loop.close()


def test_a_short_token_file_is_refused_naming_it(tmp_path, store4):
    short = tmp_path / "token"
    short.write_text("secret")
    with pytest.raises(ConfigError, match=f"token file {short}: needs one token of at least 16"):
        open_pool(store4, "127.0.0.1:1", token_file=short)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_deploy_guide_secrets_give_mutual_tls_with_the_token(expert_hosts, store4, tmp_path):  # noqa: F811
    secrets_dir = tmp_path / "secrets"
    made = subprocess.run(["bash", str(ROOT / "deploy" / "make-secrets.sh"), str(secrets_dir), "127.0.0.1"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    host = expert_hosts.start(store4, "--tls-cert", secrets_dir / "expert-host-127.0.0.1.pem",
                              "--tls-key", secrets_dir / "expert-host-127.0.0.1.key",
                              "--tls-client-ca", secrets_dir / "ca.pem", "--token-file", secrets_dir / "token")
    tls = ClientTls(ca=secrets_dir / "ca.pem", cert=secrets_dir / "coordinator.pem", key=secrets_dir / "coordinator.key")
    pool, loop = open_pool(store4, host.address, tls=tls, token_file=secrets_dir / "token")
    try:
        fetch_one(pool, loop, store4)
    finally:
        pool.close()
        loop.close()
