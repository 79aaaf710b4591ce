"""The native CPU kernel (hqq_matmul.cpp, shipped beside this file): built on first use with the
machine's own g++ (`-O3 -march=native -fopenmp -shared`, so it uses the AVX-512 or AVX2 of the
CPU it runs on), kept in a cache folder keyed by a hash of the source, the compiler and the CPU,
and loaded with ctypes. No ninja, no Python headers, no torch headers: a plain C function over
raw pointers, which ctypes calls with the GIL released.

MOE_EDGE_CPU_KERNEL picks the path: "native" (this kernel, an error if it cannot be built),
"int4pack" (torch's int4 weight-only matmul, never build), or unset / "auto" (this kernel
where it builds, else int4pack with one log line saying why). The build folder is
$MOE_EDGE_CACHE_DIR, else $XDG_CACHE_HOME/moe-edge, else ~/.cache/moe-edge, then cpu_kernels/.

MOE_EDGE_CPU_X_DIGITS picks how the kernel multiplies x: "0", as given (exactly); "1" or "2",
rounded per group of 64 to that many int8 digits and multiplied through AVX512-VNNI (an error on
a CPU without it). One digit is what llama.cpp's CPU dot products do: x within |x|max / 254 of
itself, about 5x bf16's own rounding of x in a product; two, within |x|max / 64516, some 70x finer
than bf16's. Unset: two digits for a bf16 expert on a CPU with AVX512-VNNI, x as given elsewhere
(fp32 experts stay exact). Without AVX512-BF16 (Cascade Lake, Ice Lake) x as given goes through
fp32 products, 1.4-1.7x slower than two digits on a Zen 4 core built so; with it, through
vdpbf16ps, which two digits still beat 1.6x on the H200 machine's 16-core Sapphire Rapids class
Xeon (a 2-bit Mixtral expert in 0.48 ms against 0.77, one token, 16 threads) and matched on a
Zen 4 (BENCHMARKS.md). One digit was faster again there (0.41 ms), at 5x bf16's error.

Knows nothing of experts or stores: raw matrices in, a matrix out."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("hqq_matmul.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
KERNEL_ENV = "MOE_EDGE_CPU_KERNEL"
CHOICES = ("auto", "native", "int4pack")
X_DIGITS_ENV = "MOE_EDGE_CPU_X_DIGITS"

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "library": the CDLL or None, "reason": why None


def kernel_choice(choice: str | None = None) -> str:
    """`choice`, else $MOE_EDGE_CPU_KERNEL, else "auto"; checked."""
    if choice is None:
        choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"CPU kernel {choice!r} ({KERNEL_ENV}): choose one of {', '.join(CHOICES)}")
    return choice


def x_digits(library: ctypes.CDLL, bf16: bool, choice: int | None = None) -> int:
    """The int8 digits of x for a matrix run by `library` (0: x as given) in a bf16 expert or not:
    `choice`, else $MOE_EDGE_CPU_X_DIGITS, else the default above; checked against what the
    library can multiply."""
    if choice is None:
        text = os.environ.get(X_DIGITS_ENV, "").strip()
        if text and text not in ("0", "1", "2"):
            raise ConfigError(f"{X_DIGITS_ENV}={text!r}: give 0 (x as given), 1 or 2 (int8 digits of x)")
        if not text:
            return 2 if bf16 and library.hqq_int8_products() else 0
        choice = int(text)
    if choice not in (0, 1, 2):
        raise ConfigError(f"x digits {choice}: give 0 (x as given), 1 or 2 (int8 digits of x)")
    if choice and not library.hqq_int8_products():
        raise ConfigError(f"{X_DIGITS_ENV}={choice}: x as int8 digits needs AVX512-VNNI, which this CPU "
                          f"(or the kernel's build) lacks; use 0")
    return choice


def cache_dir() -> Path:
    if os.environ.get("MOE_EDGE_CACHE_DIR"):
        return Path(os.environ["MOE_EDGE_CACHE_DIR"]) / "cpu_kernels"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe-edge" / "cpu_kernels"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and flags (a home folder may be shared by
    machines of different CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() + platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(compiler: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library built from SOURCE with `flags` (tests build other instruction sets
    with extra -mno-... flags), or the one built before with the same key. Raises OSError,
    RuntimeError or subprocess.SubprocessError."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / key / "hqq_matmul.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target under a temporary name and renamed: two processes may build at once
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as partial:
        pass
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial.name],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-600:]}")
        os.replace(partial.name, target)
    finally:
        if os.path.exists(partial.name):
            os.unlink(partial.name)
    return target


def native_library(choice: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernel, or None (auto: it could not be built; int4pack: not wanted). `choice`
    overrides $MOE_EDGE_CPU_KERNEL. The first call builds it (seconds); later calls return the
    same library."""
    choice = kernel_choice(choice)
    if choice == "int4pack":
        return None
    with _lock:
        if "library" not in _loaded:
            _loaded["library"], _loaded["reason"] = _load()
            if _loaded["library"] is None:
                log.warning("CPU experts use torch's int4pack matmul: the native kernel is unavailable (%s)", _loaded["reason"])
            else:
                log.info("CPU experts use the native kernel (%s)", describe(_loaded["library"]))
    if _loaded["library"] is None and choice == "native":
        raise ConfigError(f"CPU kernel 'native' ({KERNEL_ENV}), but the native CPU kernel is unavailable: {_loaded['reason']}")
    return _loaded["library"]


def describe(library: ctypes.CDLL) -> str:
    """What the build chose on this CPU, in words."""
    words = {512: "AVX-512", 256: "AVX2"}.get(library.hqq_vector_bits(), "plain C++")
    return (words + (", bf16 x through AVX512-BF16" if library.hqq_bf16_products() else "")
            + (", int8 x through AVX512-VNNI" if library.hqq_int8_products() else ""))


def _load() -> tuple[ctypes.CDLL | None, str]:
    import torch  # its libgomp is loaded first, so the kernel's OpenMP is torch's own

    del torch
    found = compiler()
    if found is None:
        return None, "no C++ compiler (g++) on PATH"
    try:
        return open_library(build(found)), ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"build failed: {error}"


def open_library(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.hqq_vector_bits.restype = ctypes.c_int
    library.hqq_bf16_products.restype = ctypes.c_int
    library.hqq_int8_products.restype = ctypes.c_int
    library.hqq_matmul.restype = ctypes.c_int
    library.hqq_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    return library


def load_built_with(extra_flags: tuple[str, ...]) -> ctypes.CDLL:
    """Build with `extra_flags` too (say -mno-avx512bf16: the kernel of a CPU without it), load
    it, and make it the one native_library() returns (benchmarks)."""
    library = open_library(build(compiler() or "g++", FLAGS + tuple(extra_flags)))
    with _lock:
        _loaded["library"], _loaded["reason"] = library, ""
    return library


def forget_library() -> None:
    """Drop the loaded choice, so the next native_library() decides again (tests)."""
    with _lock:
        _loaded.clear()
