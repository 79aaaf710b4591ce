"""How busy the rest of the host was while bench timed: the CPU seconds every process spent,
less this process's own (its threads, and the children it started: a --local-host expert host),
over the wall time, in cores. Prompts and runs on the CPU are bound by the host issuing work, so
a host that others keep busy reads them low (the resident prompt's per-expert path spread from
2517 to 4848 tok/s across H200 calls, cause unknown): the report says how busy the rest was."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import psutil

BUSY_CORES = 0.5  # others using more than this many cores on average: the report warns


def _all_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def _own_seconds() -> float:
    me = psutil.Process()
    own = me.cpu_times()
    total = own.user + own.system + getattr(own, "children_user", 0.0) + getattr(own, "children_system", 0.0)
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a child may end between the listing and the read
            times = child.cpu_times()
            total += times.user + times.system
    return total


@dataclass(frozen=True)
class HostLoad:
    cores: int
    others_cores: float  # the average cores other processes kept busy

    @property
    def busy(self) -> bool:
        return self.others_cores > BUSY_CORES

    def describe(self) -> str:
        line = f"host CPU: {self.cores} cores; other processes kept {self.others_cores:.1f} of them busy while it ran"
        return line + (" (a busy host reads prompts and CPU runs low)" if self.busy else "")


class HostLoadMeter:
    """start() ... stop() -> HostLoad over the time between."""

    def start(self) -> "HostLoadMeter":
        self._wall, self._all, self._own = time.perf_counter(), _all_busy_seconds(), _own_seconds()
        return self

    def stop(self) -> HostLoad:
        wall = max(time.perf_counter() - self._wall, 1e-9)
        others = (_all_busy_seconds() - self._all) - (_own_seconds() - self._own)
        return HostLoad(os.cpu_count() or 1, max(others, 0.0) / wall)
