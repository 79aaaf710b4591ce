"""TLS mistakes say which side and which file is wrong. A host given a swapped cert and key, a
key of another certificate or a file that is not PEM stops at start with one line naming the
file(s) and ConfigError's exit code, never "port taken". A coordinator whose mutual-TLS client
certificate is missing or untrusted hears that the host refused it; one with the wrong CA hears
that the host's certificate is not trusted by that CA file. Real hosts on 127.0.0.1."""

import pytest

from common.errors import ConfigError, HostError
from common.host_address import HostAddress
from common.store.reader import ExpertStore
from conftest import run_module
from coordinator.runtime.fetch_loop import FetchLoop
from coordinator.sources.cluster_config import ClientTls, ClusterConfig
from coordinator.sources.expert_pool import ExpertPool
from expert_host_processes import module_expert_hosts  # noqa: F401  (fixture)
from self_signed_certificates import SelfSignedCA


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secrets")
    ca, other_ca = SelfSignedCA(folder), SelfSignedCA(folder, "another CA")
    not_pem = folder / "not-pem.txt"
    not_pem.write_text("this is not a certificate\n")
    return dict(ca=ca, other_ca=other_ca, server=ca.issue("expert-host", server=True),
                client=ca.issue("coordinator", server=False), rogue=other_ca.issue("rogue", server=False), not_pem=not_pem)


def serve(store, *tls_args):
    return run_module("expert_host", "serve", "--store", store, "--listen", "127.0.0.1:0", *tls_args, timeout=120)


def assert_one_line_config_error(done, *names):
    assert done.returncode == ConfigError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "cannot listen" not in lines[0] and "another host" not in lines[0]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def test_a_host_given_its_cert_and_key_swapped_says_so_naming_both(store4, secrets):
    server = secrets["server"]
    line = assert_one_line_config_error(serve(store4, "--tls-cert", server.key, "--tls-key", server.cert), server.key, server.cert)
    assert "swapped" in line


def test_a_host_given_the_key_of_another_certificate_says_so_naming_both(store4, secrets):
    server, client = secrets["server"], secrets["client"]
    line = assert_one_line_config_error(serve(store4, "--tls-cert", server.cert, "--tls-key", client.key), server.cert, client.key)
    assert "is not the key of" in line


@pytest.mark.parametrize("which", ["--tls-cert", "--tls-key", "--tls-client-ca"])
def test_a_host_given_a_file_that_is_not_pem_names_it(store4, secrets, which):
    files = {"--tls-cert": secrets["server"].cert, "--tls-key": secrets["server"].key, "--tls-client-ca": secrets["ca"].files.cert}
    files[which] = secrets["not_pem"]
    args = [part for flag, path in files.items() for part in (flag, path)]
    line = assert_one_line_config_error(serve(store4, *args), secrets["not_pem"])
    assert which in line


def test_a_host_given_a_key_as_its_client_ca_names_it(store4, secrets):
    server = secrets["server"]
    line = assert_one_line_config_error(
        serve(store4, "--tls-cert", server.cert, "--tls-key", server.key, "--tls-client-ca", server.key), server.key
    )
    assert "--tls-client-ca" in line


@pytest.fixture(scope="module")
def mutual_host(module_expert_hosts, store4, secrets):  # noqa: F811
    server = secrets["server"]
    return module_expert_hosts.start(store4, "--tls-cert", server.cert, "--tls-key", server.key,
                                     "--tls-client-ca", secrets["ca"].files.cert).address


def open_pool(store, address, tls):
    loop = FetchLoop()
    try:
        pool = ExpertPool.open(ClusterConfig(hosts=(HostAddress.parse(address),), tls=tls),
                               ExpertStore(store, with_experts=False).manifest, loop)
    except BaseException:
        loop.close()
        raise
    pool.close()
    loop.close()


def test_mutual_tls_without_a_client_certificate_says_the_host_refused_it_as_missing(mutual_host, secrets, store4):
    with pytest.raises(HostError) as refused:
        open_pool(store4, mutual_host, ClientTls(ca=secrets["ca"].files.cert))
    message = str(refused.value)
    assert mutual_host in message and "the host refused our client certificate: it is missing" in message
    assert "--tls-cert/--tls-key" in message and "--tls-client-ca" in message


def test_mutual_tls_with_an_untrusted_client_certificate_names_it(mutual_host, secrets, store4):
    rogue = secrets["rogue"]
    with pytest.raises(HostError) as refused:
        open_pool(store4, mutual_host, ClientTls(ca=secrets["ca"].files.cert, cert=rogue.cert, key=rogue.key))
    message = str(refused.value)
    assert f"the host refused our client certificate {rogue.cert}" in message and "untrusted" in message
    assert "--tls-client-ca" in message


def test_a_wrong_ca_says_the_host_certificate_is_not_trusted_by_that_file(mutual_host, secrets, store4):
    client = secrets["client"]
    other_ca = secrets["other_ca"].files.cert
    with pytest.raises(HostError) as refused:
        open_pool(store4, mutual_host, ClientTls(ca=other_ca, cert=client.cert, key=client.key))
    assert f"the host's certificate is not trusted by our CA file {other_ca}" in str(refused.value)


def test_the_right_client_certificate_still_opens_the_pool(mutual_host, secrets, store4):
    client = secrets["client"]
    open_pool(store4, mutual_host, ClientTls(ca=secrets["ca"].files.cert, cert=client.cert, key=client.key))


def test_a_client_key_of_another_certificate_is_named_before_connecting(secrets, store4):
    client, rogue = secrets["client"], secrets["rogue"]
    with pytest.raises(ConfigError, match=f"TLS client key {rogue.key} .*is not the key of the client certificate {client.cert}"):
        open_pool(store4, "127.0.0.1:1", ClientTls(ca=secrets["ca"].files.cert, cert=client.cert, key=rogue.key))


def test_the_coordinator_cli_says_in_one_line_that_the_host_refused_the_client_certificate(
    mutual_host, secrets, store4, run_coordinator
):
    done = run_coordinator("generate", "--store", store4, "--prompt", "hello", "--max-new-tokens", "2",
                           "--hosts", mutual_host, "--tls-ca", secrets["ca"].files.cert, timeout=120)
    assert done.returncode == HostError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: "), done.stderr
    assert mutual_host in lines[-1] and "refused our client certificate: it is missing" in lines[-1]
