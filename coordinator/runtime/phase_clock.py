"""Where the time of a token goes, for the benchmark's breakdown. Off (None) in normal runs.

Each `mark(phase)` charges the time since the previous mark to `phase`. On CUDA it first waits
for the compute stream (not the copy stream: copies run on), so the time is the GPU's as well
as the CPU's; that serializes compute that normally overlaps with the host's work, so the
breakdown comes from a separate instrumented pass."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

PHASES = ("attention", "routing", "waiting on copies", "expert compute", "experts elsewhere", "other")


class PhaseClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def _wait(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def start(self) -> None:
        self._wait()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        self._wait()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now
