"""glibc malloc settings for the processes that move experts through gRPC (expert hosts, and the
coordinator once it uses them).

gRPC allocates a fresh buffer for every message it sends or receives. By default glibc hands
freed megabyte-sized buffers back to the kernel, so each new one is faulted in again, page by
page: on the benchmark machine that was two thirds of a host's CPU time per GB fetched
(BENCHMARKS.md). Raising the mmap and trim thresholds keeps freed buffers in the heap for reuse,
at the price of up to `trim_threshold` bytes of free heap kept by the process. Process-wide,
so it is called once, where such a process starts; a no-op without glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's bound on 64-bit systems


def keep_freed_buffers_for_reuse(*, mmap_threshold: int = _MMAP_THRESHOLD_MAX, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc serve allocations below `mmap_threshold` from the heap and keep up to
    `trim_threshold` freed bytes there. Returns whether the settings took."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it (and these mallopt parameters)
    except (OSError, AttributeError, TypeError):
        return False
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _MMAP_THRESHOLD_MAX))) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    log.debug("malloc keeps freed buffers for reuse: %s", done)
    return done


def give_freed_memory_back() -> bool:
    """Return the free memory at the top of glibc's heaps (every arena) to the kernel now, as
    `malloc_trim(0)` does: after one large, rare allocation (a server's multi-megabyte request)
    whose memory would otherwise stay in the process. Returns whether any was released; False
    without glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    return bool(trim(0))
