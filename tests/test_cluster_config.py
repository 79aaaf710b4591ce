"""cluster.toml and host addresses: what they accept, and one-line errors naming the problem."""

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.host_address import HostAddress
from coordinator.sources.cluster_config import ClientTls, PoolSettings, read_cluster_config

DEPLOY_EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "cluster.toml"


@pytest.mark.parametrize("text,host,port,loopback", [
    ("127.0.0.1:50051", "127.0.0.1", 50051, True),
    ("[::1]:7", "::1", 7, True),
    ("localhost:1", "localhost", 1, True),
    ("192.168.1.20:50051", "192.168.1.20", 50051, False),
    ("ram-pc-1:50051", "ram-pc-1", 50051, False),
])
def test_host_addresses_parse_and_know_if_they_are_loopback(text, host, port, loopback):
    address = HostAddress.parse(text)
    assert (address.host, address.port, address.is_loopback) == (host, port, loopback)
    assert str(address) == text


@pytest.mark.parametrize("text,words", [
    ("ram-pc-1", "expected HOST:PORT"), ("::1:50051", "brackets"), ("h:99999", "outside"), ("h:0", "outside"), ("unix:", "socket path"),
])
def test_bad_host_addresses_are_refused_with_a_hint(text, words):
    with pytest.raises(ConfigError, match=words):
        HostAddress.parse(text)


def test_the_deploy_example_reads(tmp_path):
    config = read_cluster_config(DEPLOY_EXAMPLE)
    assert [str(h) for h in config.hosts] == ["192.168.1.21:50051", "192.168.1.22:50051"]
    assert config.token_file == DEPLOY_EXAMPLE.parent / "secrets" / "token"
    assert config.tls.ca == DEPLOY_EXAMPLE.parent / "secrets" / "ca.pem"


def test_relative_paths_are_taken_from_the_toml_folder(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('token_file = "token"\n[tls]\nca = "ca.pem"\ncert = "/etc/c.pem"\nkey = "c.key"\n'
                    '[pool]\nfetch_deadline_s = 2.5\n[[hosts]]\naddress = "10.0.0.2:50051"\n')
    config = read_cluster_config(path)
    assert config.token_file == tmp_path / "token"
    assert config.tls == ClientTls(ca=tmp_path / "ca.pem", cert=Path("/etc/c.pem"), key=tmp_path / "c.key")
    assert config.pool == PoolSettings(fetch_deadline_s=2.5)


@pytest.mark.parametrize("text,words", [
    ("[[hosts]]\nadress = 'a:1'\n", "unknown key 'adress'"),
    ("[[hosts]]\n", "needs address"),
    ("hosts = 'a:1'\n", "array of tables"),
    ("[tls]\ncert = 'c.pem'\n", "needs ca"),
    ("[pool]\nfetch_deadline_s = -1\n", "must be positive"),
    ("[pool]\nfetch_deadline_s = 'soon'\n", "must be a number"),
    ("[[hosts]]\naddress = 'a:1'\n[[hosts]]\naddress = 'a:1'\n", "listed twice"),
    ("hosts = [\n", "not valid TOML"),
])
def test_bad_cluster_files_get_one_line_naming_the_problem(tmp_path, text, words):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words) as refused:
        read_cluster_config(path)
    assert "\n" not in str(refused.value).strip()
