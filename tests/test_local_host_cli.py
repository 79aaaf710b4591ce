"""The coordinator's command line with expert hosts: `generate --local-host` (the README's
single-machine command) and `--cluster cluster.toml` give the in-process tokens, and a local
host never outlives its coordinator. Plus the argument checks of source_from_args."""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from common.errors import ConfigError
from conftest import ROOT, coordinator_cli
from coordinator.cli.engine_args import add_engine_arguments, open_engine, source_from_args
from coordinator.runtime.engine import Engine
from coordinator.sources.local_host import SHARED_FILE_PREFIX, SHARED_MEMORY_ROOT
from coordinator.sources.shared_memory import ORIGIN
from expert_host_processes import expert_hosts  # noqa: F401  (fixture)

PROMPT = "The quick brown fox"


def generate_json(store, *args):
    """`generate --json` run in this process; its --local-host is still a real child process."""
    done = coordinator_cli("generate", "--store", store, "--prompt", PROMPT, "--max-new-tokens", "12",
                           "--cache-experts", "2", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def expert_host_processes_of(store):
    """expert_host processes serving `store` (a path unique to this test session)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "expert_host" in cmdline and str(store) in cmdline:
            found.append(process)
    return found


@pytest.fixture(scope="module")
def reference(store4):
    """The in-process (RAM) source's tokens, with generate's settings."""
    with Engine.open(store4, source="ram", cache_experts=2) as engine:
        generation = engine.generate(PROMPT, max_new_tokens=12)
        list(generation)
    return generation.token_ids


def shared_files_of(pid: int) -> list[Path]:
    """What --local-host of process `pid` has in /dev/shm."""
    return sorted(SHARED_MEMORY_ROOT.glob(f"{SHARED_FILE_PREFIX}{pid}-*"))


def test_generate_with_local_host_gives_the_in_process_tokens_and_leaves_no_host(store4, reference):
    result = generate_json(store4, "--local-host")
    assert result["token_ids"] == reference
    (origin,) = result["stats"]["bytes_by_source"]
    assert origin == ORIGIN  # read from the host's shared memory, not over its socket
    assert result["stats"]["fetches_by_source"][origin] > 0
    assert expert_host_processes_of(store4) == []
    assert shared_files_of(os.getpid()) == []


def test_local_host_experts_in_shared_memory_outlive_a_killed_host_and_leave_nothing_in_dev_shm(store4, reference):
    engine = open_engine(parse_for(store4, "--local-host", "--cache-experts", "2"), progress=False)
    try:
        assert shared_files_of(os.getpid()) == []  # mapped, then removed at once
        (host,) = expert_host_processes_of(store4)
        host.kill()
        host.wait(10)
        generation = engine.generate(PROMPT, max_new_tokens=12)
        list(generation)  # fetches read the mapping, which the host's death does not take away
        assert generation.token_ids == reference
    finally:
        engine.close()
    assert shared_files_of(os.getpid()) == [] and expert_host_processes_of(store4) == []


def test_generate_with_a_cluster_file_gives_the_in_process_tokens(expert_hosts, store4, reference, tmp_path):  # noqa: F811
    low, high = expert_hosts.start_many([(store4, "--layers", "0-1"), (store4, "--layers", "2-3")])
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(f'[pool]\nfetch_deadline_s = 10\n\n[[hosts]]\naddress = "{low.address}"\n\n[[hosts]]\naddress = "{high.address}"\n')
    result = generate_json(store4, "--cluster", cluster)
    assert result["token_ids"] == reference
    assert set(result["stats"]["fetches_by_source"]) == {low.address, high.address}


def test_a_killed_coordinator_takes_its_local_host_with_it(store2):
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "generate", "--store", str(store2), "--local-host", "--prompt", PROMPT,
         "--max-new-tokens", "1000", "--cache-experts", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (hosts := expert_host_processes_of(store2)):
            assert coordinator.poll() is None and time.monotonic() < deadline, "no local host started"
            time.sleep(0.1)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(10)
        gone, alive = psutil.wait_procs(hosts, timeout=10)
        assert alive == [], "the local expert host outlived its coordinator"
        assert shared_files_of(coordinator.pid) == [], "the local host's shared memory outlived both"
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
        for host in expert_host_processes_of(store2):
            host.kill()


def parse_for(store, *argv):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(["--store", str(store), *argv])


def parse(*argv):
    return parse_for("S", *argv)


def test_source_arguments_turn_into_a_source_or_a_clear_error():
    assert source_from_args(parse()) == "ram"
    assert source_from_args(parse("--source", "disk")) == "disk"
    assert callable(source_from_args(parse("--hosts", "127.0.0.1:50051,[::1]:50052")))
    with pytest.raises(ConfigError, match="--token-file applies to expert hosts"):
        source_from_args(parse("--token-file", "t"))
    with pytest.raises(ConfigError, match="--source disk: the experts come from expert hosts"):
        source_from_args(parse("--source", "disk", "--hosts", "127.0.0.1:50051"))
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        source_from_args(parse("--hosts", "ram-pc-1"))
    with pytest.raises(ConfigError, match="--tls-cert/--tls-key need --tls-ca"):
        source_from_args(parse("--hosts", "127.0.0.1:50051", "--tls-cert", "c.pem", "--tls-key", "k.pem"))


def test_a_dev_shm_too_small_for_the_experts_leaves_them_on_the_socket_and_says_so(store4, monkeypatch, caplog):
    from types import SimpleNamespace

    from coordinator.sources import local_host

    monkeypatch.setattr(local_host.os, "statvfs", lambda path: SimpleNamespace(f_bavail=16, f_frsize=4096))
    host = local_host.LocalHost(store4)
    try:
        assert host.shared_file is None
        assert "serves them over its socket" in caplog.text
    finally:
        host.stop()


def test_a_host_stopping_while_it_loads_makes_no_shared_file_after_removing_it(tmp_path, monkeypatch):
    """The race a coordinator killed at once can hit: the host's exit removes the shared file
    before its loading thread has made it; the thread must not make it after."""
    from common.errors import StoreError
    from expert_host import shard

    monkeypatch.setattr(shard, "_arenas_closed", False)
    path = tmp_path / "moe-edge-experts-test"
    shard.close_shared_arenas(path)  # what the host's exit does
    with pytest.raises(StoreError, match="stopping"):
        shard._shared_arena(path, (2, 4096))
    assert not path.exists()


def test_a_host_stopping_while_its_shared_file_is_mapped_leaves_no_file(tmp_path, monkeypatch):
    """The other side of that race: the exit comes after the loading thread made the file and
    before it mapped it (torch.from_file opens the path with O_CREAT): the exit waits for the
    mapping, then removes the file, and nothing makes it again."""
    from expert_host import shard

    monkeypatch.setattr(shard, "_arenas_closed", False)
    path = tmp_path / "moe-edge-experts-test"
    mapping, real_from_file = threading.Event(), shard.torch.from_file

    def slow_from_file(*args, **kwargs):
        mapping.set()
        time.sleep(0.3)  # the exit's window, were the lock let go before the mapping
        return real_from_file(*args, **kwargs)

    monkeypatch.setattr(shard.torch, "from_file", slow_from_file)
    loader = threading.Thread(target=shard._shared_arena, args=(path, (2, 4096)))
    loader.start()
    assert mapping.wait(10)
    shard.close_shared_arenas(path)  # what the host's exit does
    loader.join(10)
    assert not loader.is_alive() and not path.exists()
