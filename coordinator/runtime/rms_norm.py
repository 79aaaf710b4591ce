"""RMSNorm exactly as Mixtral computes it."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise in float32, cast back to x's dtype, then scale (the order matters in fp16).
    torch's own rms_norm does the float32 part in one kernel on CUDA, where five ran before.
    `out`: where the result goes (a static buffer, or x itself), instead of a new tensor."""
    dtype = x.dtype
    return torch.mul(weight, F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(dtype), out=out)
