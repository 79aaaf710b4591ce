"""Real expert hosts for tests: `python -m expert_host serve` processes on 127.0.0.1 with an
ephemeral port (each writes its bound address to a file, so no port is guessed), killed when
the test (or module) ends. Their logs go to files, shown when a start fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60


@dataclass
class HostProcess:
    process: subprocess.Popen
    address: str
    command: list[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM (graceful stop); returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


class HostLauncher:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hosts: list[HostProcess] = []
        self._count = 0

    def start(self, store: Path, *args: str, listen: str = "127.0.0.1:0") -> HostProcess:
        return self.start_many([(store, *args)], listen=listen)[0]

    def start_many(self, specs: list[tuple], *, listen: str = "127.0.0.1:0") -> list[HostProcess]:
        """Start one host per (store, *args) at once (their start-ups overlap), wait for all."""
        pending = []
        for store, *args in specs:
            self._count += 1
            address_file = self.folder / f"host-{self._count}.address"
            log_path = self.folder / f"host-{self._count}.log"
            command = [sys.executable, "-m", "expert_host", "serve", "--store", str(store), "--listen", listen,
                       "--address-file", str(address_file), "--grace-period", "1", *map(str, args)]
            with open(log_path, "w") as log:
                process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
            host = HostProcess(process, "", command, log_path)
            self.hosts.append(host)
            pending.append((host, address_file))
        deadline = time.monotonic() + START_TIMEOUT_S
        for host, address_file in pending:
            while not address_file.exists():
                if host.process.poll() is not None:
                    pytest.fail(f"expert host exited with {host.process.returncode}:\n{host.log()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"expert host not serving after {START_TIMEOUT_S} s:\n{host.log()}")
                time.sleep(0.05)
            host.address = address_file.read_text().strip()
        return [host for host, _ in pending]

    def close(self) -> None:
        for host in self.hosts:
            host.kill()


@pytest.fixture
def expert_hosts(tmp_path):
    launcher = HostLauncher(tmp_path)
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_expert_hosts(tmp_path_factory):
    launcher = HostLauncher(tmp_path_factory.mktemp("hosts"))
    yield launcher
    launcher.close()
