"""The host's memory-copy bandwidth, measured once at start and reported by Info: the
coordinator (and the user) can see what a host's RAM can feed, next to what the link carries."""

from __future__ import annotations

import time

import numpy as np


def measure_memory_gbps(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Best-of-`repeats` GB/s of one large copy between two already-touched buffers (one thread)."""
    source = np.ones(nbytes, dtype=np.uint8)
    target = np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9
