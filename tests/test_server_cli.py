"""`python -m coordinator serve` as a user runs it: a real process on 127.0.0.1 and a free port,
answering the openai package with its key, stopping on Ctrl-C; and refusing unsafe or malformed
settings with one line before it loads the model (those checks run in this process: no signal or
child process is involved)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import ROOT, coordinator_cli

KEY = "cli-test-key"


@pytest.fixture
def serve_process(store16, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", "--store", str(store16), "--listen", "127.0.0.1:0",
         "--api-key-file", str(key_file), "--cache-experts", "2", "--model-name", "tiny-cli"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def wait_for_line(lines: queue.Queue, pattern: str, timeout_s: float = 120.0) -> re.Match:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s; output:\n{''.join(seen)}")


def test_serve_command_answers_the_openai_package_with_its_key_and_stops_cleanly_on_sigterm(serve_process):
    process, lines = serve_process
    url = wait_for_line(lines, r"serving tiny-cli on (http://127\.0\.0\.1:\d+) ").group(1)
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=60, max_retries=0) as sdk:
        stream = sdk.chat.completions.create(model="tiny-cli", messages=[{"role": "user", "content": "Hello world"}],
                                             max_tokens=8, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2
    assert httpx.post(url + "/v1/completions", json={"prompt": "Hi"}, timeout=10).status_code == 401
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    wait_for_line(lines, r"moe-edge: stopped", timeout_s=5)


def test_serve_refuses_a_non_loopback_address_without_a_key(store16):
    result = coordinator_cli("serve", "--store", store16, "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "--api-key-file" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--listen", "localhost"], "expected HOST:PORT"),
    (["--listen", "127.0.0.1:99999"], "outside 0-65535"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--api-key-file", "/nonexistent/key"], "cannot read it"),
])
def test_serve_rejects_bad_settings_with_one_line(store16, args, message):
    result = coordinator_cli("serve", "--store", store16, *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
