"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): its weights, its compressed KV cache
and its math. `Transformer.attention` and `KVCache` (model.py) hand over to this file when the
model config says `attention == "latent"`; everything else about a layer is model.py's.

What it computes, as transformers' DeepseekV3Attention does:
  q      = q_b(norm(q_a(x)))  (or q_proj(x)), per head [nope | rope]
  kv_a(x) = [latent | k_pe]; latent = norm(latent); rotary on q_pe and on k_pe (one head shared
  by all query heads); k_nope and v per head = kv_b(latent).
The cache holds per position the normed latent [C] and the turned k_pe [R], not per-head keys
and values. Rather than expand every cached latent through kv_b at each step, kv_b is absorbed:
its k part turns each query head's q_nope into the latent space (q_nope . k_nope = (q_nope W_uk)
. latent) and its v part turns the attended latent into the head's value space. The same
numbers in another order: within float32 rounding of transformers' expanded form.

Knows nothing of experts, routing or CUDA graphs; with a device position [1] (the decode path)
it attends over the whole cache capacity, masked past the position by the caller's mask.

Dimension legend: T = tokens in this step, S = positions in the cache, H = hidden size,
Q = query heads, N = qk_nope_head_dim, R = qk_rope_head_dim, C = kv_lora_rank,
Vd = v_head_dim, P = positions the rotary tables cover."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from common.model_config import ModelConfig
from common.store import dense_names

from . import rope
from .rms_norm import rms_norm

# transformers and DeepSeek's own code build q_a_layernorm and kv_a_layernorm with RMSNorm's
# default eps, not the config's rms_norm_eps
LATENT_NORM_EPS = 1e-6


@dataclass
class LatentWeights:
    """One layer's latent attention weights on the device (its o_proj is LayerWeights.o_proj)."""

    q_a_proj: torch.Tensor | None  # [q_lora_rank, H]; None without a q bottleneck
    q_a_norm: torch.Tensor | None  # [q_lora_rank]
    q_b_proj: torch.Tensor  # [Q*(N+R), q_lora_rank], or q_proj [Q*(N+R), H] without the bottleneck
    kv_a_proj: torch.Tensor  # [C+R, H]
    kv_a_norm: torch.Tensor  # [C]
    k_up: torch.Tensor  # [Q, N, C]: kv_b's k part, absorbed into the queries
    v_up: torch.Tensor  # [Q, Vd, C]: kv_b's v part, applied to the attended latent

    @classmethod
    def load(cls, layer: int, config: ModelConfig, plain: Callable[[str], torch.Tensor],
             projection: Callable[[str], torch.Tensor]) -> "LatentWeights":
        """`plain` reads a store tensor onto the device; `projection` also dequantizes one."""
        def name(part: str) -> str:
            return dense_names.latent_attention(layer, part)

        bottleneck = config.q_lora_rank is not None
        kv_b = projection(name("kv_b_proj"))  # [Q*(N+Vd), C]
        kv_b = kv_b.view(config.num_heads, config.qk_nope_head_dim + config.v_head_dim, config.kv_lora_rank)
        return cls(
            q_a_proj=projection(name("q_a_proj")) if bottleneck else None,
            q_a_norm=plain(name("q_a_norm")) if bottleneck else None,
            q_b_proj=projection(name("q_b_proj" if bottleneck else "q_proj")),
            kv_a_proj=projection(name("kv_a_proj")),
            kv_a_norm=plain(name("kv_a_norm")),
            k_up=kv_b[:, : config.qk_nope_head_dim].contiguous(),
            v_up=kv_b[:, config.qk_nope_head_dim :].contiguous(),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]


def cache_shapes(config: ModelConfig, capacity: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The compressed cache as KVCache holds it: one 'head' of latents [L, 1, S, C] in place of
    keys and one of turned k_pe [L, 1, S, R] in place of values, so KVCache.update serves both."""
    return ((config.num_layers, 1, capacity, config.kv_lora_rank),
            (config.num_layers, 1, capacity, config.qk_rope_head_dim))


class LatentRotary:
    """cos/sin of each position for the R rotary dims (float32 as transformers, cast once).
    DeepSeek's checkpoints pair the dims as (x0, x1), (x2, x3), ... (`rope_interleave`); the
    others as the two halves. Either way the turned pairs come out as [firsts | seconds], as in
    transformers: q_pe and k_pe get the same layout, so their dot products are the same.

    [f * cos - s * sin | s * cos + f * sin] for the pairs' firsts f and seconds s is computed as
    [f | s | s | f] times one table row [cos | cos | -sin | sin], its two halves added: the same
    numbers (a negation is exact) in three kernels."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq, scaling = rope.inverse_frequencies(config, config.qk_rope_head_dim)  # [R/2]; YaRN's mscale
        freqs = torch.arange(config.max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [P, R/2]
        cos = (freqs.cos() * scaling).to(device=device, dtype=dtype)
        sin = (freqs.sin() * scaling).to(device=device, dtype=dtype)
        self.table = torch.cat([cos, cos, -sin, sin], dim=-1)  # [P, 2R]
        self.interleave = config.rope_interleave

    def rows(self, start: int | torch.Tensor, length: int) -> torch.Tensor:
        """The table rows [T, 2R] of positions start..start+T-1 (or of a device position [1])."""
        if isinstance(start, torch.Tensor):
            return self.table.index_select(0, start)
        return self.table[start : start + length]

    def apply(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x [heads, T, R] at the positions of the table rows [T, 2R] -> turned [heads, T, R]."""
        if self.interleave:
            first, second = x[..., 0::2], x[..., 1::2]
        else:
            first, second = x.chunk(2, dim=-1)
        products = torch.cat([first, second, second, first], dim=-1) * rows  # [heads, T, 2R]
        width = x.shape[-1]
        return products[..., :width] + products[..., width:]


class LatentAttention:
    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.rotary = LatentRotary(config, device, dtype)
        # with YaRN, DeepSeek also scales the softmax by mscale(factor, mscale_all_dim)^2 (yarn_apply_mscale)
        self.scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5 * config.softmax_scale_factor

    def forward(self, x: torch.Tensor, weights: LatentWeights, o_proj: torch.Tensor, layer: int,
                start: int | torch.Tensor, kv, mask: torch.Tensor | None,
                rotary_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] (normed) -> [T, H]. `kv` is model.KVCache laid out by cache_shapes; `mask`
        the additive [T, S] causal mask (None when nothing needs masking); `rotary_rows` the
        positions' LatentRotary rows [T, 2R] where the caller looked them up already."""
        c, w = self.config, weights
        length = x.shape[0]
        if w.q_a_proj is not None:
            q = F.linear(rms_norm(F.linear(x, w.q_a_proj), w.q_a_norm, LATENT_NORM_EPS), w.q_b_proj)
        else:
            q = F.linear(x, w.q_b_proj)
        q = q.view(length, c.num_heads, -1).transpose(0, 1)  # [Q, T, N+R]
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)  # [Q, T, N], [Q, T, R]
        latent, k_pe = F.linear(x, w.kv_a_proj).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)  # [T, C], [T, R]
        latent = rms_norm(latent, w.kv_a_norm, LATENT_NORM_EPS)
        rows = rotary_rows if rotary_rows is not None else self.rotary.rows(start, length)  # [T, 2R]
        q_pe, k_pe = self.rotary.apply(q_pe, rows), self.rotary.apply(k_pe[None], rows)  # [Q, T, R], [1, T, R]
        latents, k_pes = kv.update(layer, start, latent[None], k_pe)  # [1, S, C], [1, S, R]
        q_latent = torch.matmul(q_nope, w.k_up)  # [Q, T, C]: kv_b's k part absorbed
        scores = torch.matmul(q_latent, latents[0].T) + torch.matmul(q_pe, k_pes[0].T)  # [Q, T, S]
        scores = scores * self.scale
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1)  # in float32 inside the kernel, rounded once to q's dtype on the way out
        attended = torch.matmul(probs, latents[0])  # [Q, T, C]
        out = torch.matmul(attended, w.v_up.transpose(1, 2))  # [Q, T, Vd]
        return F.linear(out.transpose(0, 1).reshape(length, -1), o_proj)  # [T, Q*Vd] -> [T, H]
