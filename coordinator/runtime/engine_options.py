"""EngineOptions: every option that shapes an engine, with its one default, its one check and
its one clamp against the model. The CLI (generate, serve, bench), the Python API and the
benchmark all build an Engine from these; nothing else holds a default or re-checks a value.

Imports no torch at module level, so `--help` can show the defaults without loading it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from common.errors import ConfigError
from common.model_config import ModelConfig

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEVICE_NAMES = ("cpu", "cuda")
LOCAL_SOURCES = ("ram", "disk")
PLACEMENTS = ("copy", "run", "auto")  # runtime/placement.py says what each does
AUTO_PREFETCH_DEPTH = 2  # placement auto's lookahead when --prefetch-depth is not given (EngineOptions.depth)
GPU_RESERVE_BYTES = 1 << 30  # left free by --gpu-budget-gb for activations, the KV cache and allocator slack


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    cache_experts: int = 4  # expert slots per layer on the device (clamped to the experts per layer)
    gpu_budget_gb: float | None = None  # derive cache_experts from a device memory budget instead
    prefetch: bool = True
    prefetch_depth: int | None = None  # layers ahead; None: `depth`'s default (clamped to the layers that follow)
    prefetch_width: int | None = None  # experts guessed per layer ahead; default: the model's top-k
    source: str = "ram"  # ram | disk, or "custom" when Engine.open is given a source factory
    fused_kernels: bool = True  # Triton dequantize+matmul on CUDA (ignored elsewhere)
    cuda_graphs: bool = True  # capture the decode step as CUDA graphs (ignored off CUDA)
    placement: str = "copy"  # per miss: copy into the cache, run where it lives, or auto (placement.py)
    prompt_chunk: int = 1024  # prompt tokens per pass of the prompt path: bounds its activations' memory
    progress: bool = False
    layers_after_first: int | None = None  # set by for_model: the most layers a guess can look ahead

    @property
    def depth(self) -> int:
        """Layers the router lookahead guesses ahead: prefetch_depth when given, else 1, or
        AUTO_PREFETCH_DEPTH under placement auto, whose guesses that would land late run where
        they live instead, so a longer lead turns more of them into copies in time (copy's wrong
        guesses would take the link: BENCHMARKS.md, 2026-12-02). At most the layers that follow
        the first, once for_model has seen the model."""
        depth = self.prefetch_depth or (AUTO_PREFETCH_DEPTH if self.placement == "auto" else 1)
        return depth if self.layers_after_first is None else max(1, min(depth, self.layers_after_first))

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Checks that need no model: each names the command-line flag it comes from."""
        if self.device not in DEVICE_NAMES and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device}: choose cpu or cuda")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPE_NAMES)}")
        if self.cache_experts < 1:
            raise ConfigError(f"--cache-experts {self.cache_experts}: needs at least 1 slot per layer")
        if self.gpu_budget_gb is not None and not self.gpu_budget_gb > 0:
            raise ConfigError(f"--gpu-budget-gb {self.gpu_budget_gb}: must be a positive number of GB")
        if self.prefetch_depth is not None and self.prefetch_depth < 1:
            raise ConfigError(f"--prefetch-depth {self.prefetch_depth}: must be at least 1 (use --no-prefetch to turn it off)")
        if self.prefetch_width is not None and self.prefetch_width < 1:
            raise ConfigError(f"prefetch_width {self.prefetch_width}: must be at least 1")
        if self.prompt_chunk < 1:
            raise ConfigError(f"--prompt-chunk {self.prompt_chunk}: must be at least 1 token")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--placement {self.placement}: choose {', '.join(PLACEMENTS)}")
        if self.source not in (*LOCAL_SOURCES, "custom"):
            raise ConfigError(f"--source {self.source}: choose {' or '.join(LOCAL_SOURCES)}")

    def for_model(self, config: ModelConfig) -> "EngineOptions":
        """The same options clamped to what the model has: slots and guesses to its experts per
        layer, the lookahead to the layers that follow. Clamping is not an error: K = 16 on an
        8-expert model means "all of them"."""
        return replace(
            self,
            cache_experts=min(self.cache_experts, config.num_experts),
            prefetch_width=min(self.prefetch_width or config.top_k, config.num_experts),
            layers_after_first=config.num_layers - 1,
        )

    def torch_device(self) -> "torch.device":
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: no CUDA GPU is visible to torch here; use --device cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: "torch.device") -> "torch.dtype":
        import torch

        if self.dtype is None:
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)


def cache_experts_for_budget(budget_gb: float, *, dense_bytes: int, blob_bytes: int, layers: int, experts: int,
                             reserve_bytes: int = GPU_RESERVE_BYTES) -> int:
    """Slots per layer that fit a device memory budget after the dense weights and a reserve."""
    per_slot_row = layers * blob_bytes
    slots = int((budget_gb * 1e9 - dense_bytes - reserve_bytes) // per_slot_row)
    if slots < 1:
        raise ConfigError(f"--gpu-budget-gb {budget_gb}: too small; the dense part alone needs {dense_bytes / 1e9:.1f} GB")
    return min(slots, experts)
