"""The Mixtral forward pass, written out: embedding, RMSNorm, rotary attention with grouped KV
heads and a static KV cache, the sparse MoE block, final norm and LM head.

It holds only the dense weights (on the device). Experts come from an ExpertProvider (the GPU
expert cache), so this file knows nothing of slots, sources or prefetching; `moe.py` is where
routing meets the cache. `Transformer.forward` is the prompt path (many tokens at once); the
decode step (one token) is decoder.py, which reuses `attention` and the MoE block's routing; on
CUDA with Triton that token's attention runs through kernels/decode_attention.py instead of the
torch ops below (MOE_EDGE_FUSED_ATTENTION=0 keeps them; `fused_decode_attention` decides).

Dimension legend: T = tokens in this step, S = positions held in the KV cache, H = hidden size,
Q = query heads, K = key/value heads, D = head dim, V = vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.model_config import ModelConfig

from . import latent_attention
from .latent_attention import LatentAttention
from . import rope
from .attention_sinks import softmax_with_sinks
from .moe import MoEBlock
from .rms_norm import rms_norm
from .weights import DenseWeights, gated_ffn


class RotaryEmbedding:
    """cos/sin tables for every position, computed as transformers does (float32), cast once;
    the frequencies and their scaling per rope type are rope.py's. With a rotary_dim below the
    head dim (GLM-4.5's partial rotary), only the first rotary_dim of each head turn; the rest
    pass through.

    transformers turns x as x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2 | x1] for the
    halves [x1 | x2]. Here one table row per position is [cos | sin'] with rotate_half's minus
    folded into sin' = [-sin1 | sin2], so that x * cos + [x2 | x1] * sin' gives the same numbers
    (a negation is exact) in three kernels: one copy [x | x2 | x1], one multiply by the row, one
    add of its two halves, written back over x."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        dim = config.rotary_width
        inv_freq, scaling = rope.inverse_frequencies(config)  # [R/2]
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [P, R]
        cos, sin = angles.cos(), angles.sin()
        if scaling != 1.0:  # YaRN's attention factor
            cos, sin = cos * scaling, sin * scaling
        sin[:, : dim // 2] = -sin[:, : dim // 2]  # rotate_half's minus
        self.table = torch.cat([cos, sin], dim=-1).to(device=device, dtype=dtype)  # [P, 2R]: [cos | sin']
        self.dim = dim

    def rows(self, start: int | torch.Tensor, length: int) -> torch.Tensor:
        """The table rows [T, 2R] of positions start..start+T-1 (or of a device position [1])."""
        if isinstance(start, torch.Tensor):
            return self.table.index_select(0, start)
        return self.table[start : start + length]

    def turn_(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Turn x [heads, T, D] in place (x may be a view, e.g. into the qkv projection's output)
        by the rows [T, 2R] of its positions; past the rotary width x is left as it is."""
        dim, half = self.dim, self.dim // 2
        spread = torch.cat([x[..., :dim], x[..., half:dim], x[..., :half]], dim=-1)  # [heads, T, 2R]: [x | x2 | x1]
        products = spread * rows  # [x * cos | [x2 | x1] * sin']
        torch.add(products[..., :dim], products[..., dim:], out=x[..., :dim])


class KVCache:
    """Keys and values of one sequence, preallocated for `capacity` positions. With latent
    attention, the compressed cache instead: latents in `keys`, k_pe in `values`, one head each
    (latent_attention.cache_shapes).

    Grouped attention keeps a layer's keys and values in one block [2K, S, D] (`keys` and
    `values` are its halves, each [K, S, D] contiguous per layer), so that the new token's keys
    and values, side by side in the qkv projection's output, go in with one copy."""

    def __init__(self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.stacked = None  # [L, 2K, S, D]: keys then values, per layer
        if config.attention == "latent":
            key_shape, value_shape = latent_attention.cache_shapes(config, capacity)  # [L, 1, S, C], [L, 1, S, R]
            self.keys = torch.zeros(key_shape, device=device, dtype=dtype)
            self.values = torch.zeros(value_shape, device=device, dtype=dtype)
        else:
            heads = config.num_kv_heads
            self.stacked = torch.zeros(config.num_layers, 2 * heads, capacity, config.head_dim, device=device, dtype=dtype)
            self.keys, self.values = self.stacked[:, :heads], self.stacked[:, heads:]  # [L, K, S, D] each
        self.capacity = capacity
        self.decode_partials = None  # the fused decode attention's scratch (kernels/decode_attention.py), made at first use

    def update(self, layer: int, start: int | torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Store [K, T, D] at positions start.., return all [K, start+T, D] so far. With a device
        position [1] (CUDA graphs: one token), return the whole capacity [K, S, D]; the caller
        masks what lies past the position."""
        if isinstance(start, torch.Tensor):
            self.keys[layer].index_copy_(1, start, keys)
            self.values[layer].index_copy_(1, start, values)
            return self.keys[layer], self.values[layer]
        end = start + keys.shape[1]
        self.keys[layer, :, start:end] = keys
        self.values[layer, :, start:end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def update_stacked(self, layer: int, start: int | torch.Tensor, keys_and_values: torch.Tensor):
        """`update` with keys and values given as one [2K, T, D] (keys first): one copy."""
        if isinstance(start, torch.Tensor):
            self.stacked[layer].index_copy_(1, start, keys_and_values)
            return self.keys[layer], self.values[layer]
        end = start + keys_and_values.shape[1]
        self.stacked[layer, :, start:end] = keys_and_values
        return self.keys[layer, :, :end], self.values[layer, :, :end]


class StepTables:
    """What every layer of one decode step shares, looked up once per token instead of once per
    layer: the position's rotary table row and the additive mask over the KV capacity for
    each sliding window the model has (keyed by the window; None: no window). Static buffers, filled by `fill` (inside the
    decoder's embed graph): on a fast GPU a decode step is bound by its kernel count."""

    def __init__(self, model: "Transformer", capacity: int) -> None:
        c = model.config
        self.model, self.capacity = model, capacity
        windows = {c.window_of(layer) for layer in range(c.num_layers)}
        self.masks = {window: torch.zeros(1, capacity, device=model.device, dtype=model.dtype) for window in windows}
        rotary = model.rotary if model.rotary is not None else model.latent.rotary
        self.rotary_table = rotary.table  # [P, 2R]: RotaryEmbedding's, or LatentRotary's
        self.rotary_rows = torch.zeros(1, rotary.table.shape[1], device=model.device, dtype=model.dtype)  # [1, 2R]

    def fill(self, position: torch.Tensor) -> None:
        """position: the token's position, a device tensor [1]."""
        torch.index_select(self.rotary_table, 0, position, out=self.rotary_rows)
        for window, mask in self.masks.items():
            self.model._mask(position, 1, self.capacity, window, out=mask)


def fused_decode_attention(config: ModelConfig, device: torch.device):
    """kernels/decode_attention.py where one decode token's attention may run through it (CUDA
    with Triton, grouped attention, MOE_EDGE_FUSED_ATTENTION not "0"), else None: the torch
    path, the only one off CUDA."""
    from .kernels import switched_on

    if config.attention == "latent" or not switched_on(device, "MOE_EDGE_FUSED_ATTENTION"):
        return None
    from .kernels import decode_attention

    return decode_attention


class Transformer:
    def __init__(self, config: ModelConfig, weights: DenseWeights, moe: MoEBlock, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.weights = weights
        self.moe = moe
        self.device = device
        self.dtype = dtype
        latent = config.attention == "latent"
        self.rotary = None if latent else RotaryEmbedding(config, device, dtype)
        self.latent = LatentAttention(config, device, dtype) if latent else None
        self.scale = config.head_dim**-0.5
        self.decode_attention = fused_decode_attention(config, device)  # the module, or None

    def attention(self, x: torch.Tensor, layer: int, start: int | torch.Tensor, kv: KVCache,
                  step: "StepTables | None" = None) -> torch.Tensor:
        """x [T, H] (normed) -> [T, H]. `start` may be a device tensor [1] (one token, CUDA graphs);
        then `step` may hold what every layer of that token shares (its rotary rows and masks)."""
        c, w = self.config, self.weights.layers[layer]
        length = x.shape[0]
        window = c.window_of(layer)
        mask = step.masks[window] if step is not None else None
        if self.latent is not None:  # DeepSeek-V3's multi-head latent attention: latent_attention.py
            total = kv.capacity if isinstance(start, torch.Tensor) else start + length
            if step is None:
                mask = self._mask(start, length, total, window)
            return self.latent.forward(x, w.latent, w.o_proj, layer, start, kv, mask,
                                       step.rotary_rows if step is not None else None)
        qkv = None
        if w.qkv_proj is not None:  # one matmul for the three projections (views of one weight)
            qkv = _projection(x, w.qkv_proj, w.qkv_bias, w.qkv_int4)  # [T, (Q+2K)*D]
            q, k, v = qkv.split(w.qkv_widths, dim=-1)
        else:
            q, k, v = F.linear(x, w.q_proj, w.q_bias), F.linear(x, w.k_proj, w.k_bias), F.linear(x, w.v_proj, w.v_bias)
        # From here q and k are normed and turned in place: with one qkv output, the turned keys
        # end up beside the values, and the cache takes both in one copy.
        if c.qk_norm == "projection":  # OLMoE: one RMSNorm over all heads of the projection
            rms_norm(q, w.q_norm, c.rms_norm_eps, out=q), rms_norm(k, w.k_norm, c.rms_norm_eps, out=k)
        q = q.view(length, c.num_heads, c.head_dim)  # [T, Q, D]
        k = k.view(length, c.num_kv_heads, c.head_dim)  # [T, K, D]
        heads = None if qkv is None else qkv.view(length, c.num_heads + 2 * c.num_kv_heads, c.head_dim)  # [T, Q+2K, D]
        if w.qk_norm_rows is not None:  # Qwen3: an RMSNorm over each head, q's and k's heads at once
            query_and_key = heads[:, : c.num_heads + c.num_kv_heads]  # [T, Q+K, D]
            rms_norm(query_and_key, w.qk_norm_rows, c.rms_norm_eps, out=query_and_key)
        elif c.qk_norm == "head":
            rms_norm(q, w.q_norm, c.rms_norm_eps, out=q), rms_norm(k, w.k_norm, c.rms_norm_eps, out=k)
        rows = step.rotary_rows if step is not None else self.rotary.rows(start, length)  # [T, 2R]
        if (self.decode_attention is not None and length == 1 and isinstance(start, torch.Tensor)
                and heads is not None and w.sinks is None):  # one decode token: three kernels, positions <= start only
            return _projection(self._fused_decode(heads, rows, layer, start, kv, window), w.o_proj, w.o_bias, w.o_int4)
        if heads is not None:  # q and k side by side: turned together
            self.rotary.turn_(heads[:, : c.num_heads + c.num_kv_heads].transpose(0, 1), rows)
            keys, values = kv.update_stacked(layer, start, heads[:, c.num_heads :].transpose(0, 1))  # [K, S, D] each
        else:
            self.rotary.turn_(q.transpose(0, 1), rows)
            self.rotary.turn_(k.transpose(0, 1), rows)
            keys, values = kv.update(layer, start, k.transpose(0, 1), v.view(length, c.num_kv_heads, c.head_dim).transpose(0, 1))
        q = q.transpose(0, 1)  # [Q, T, D]
        group = c.num_heads // c.num_kv_heads
        q = q.reshape(c.num_kv_heads, group * length, c.head_dim)  # query heads of one KV head side by side
        if step is None:
            mask = self._mask(start, length, keys.shape[1], window)
        if length > 1 and w.sinks is None:  # a prompt: one fused kernel, no [T, S] scores kept per head
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if mask is None else mask.repeat(group, 1),
                                                 scale=self.scale)  # [K, group*T, D]
            out = out.view(c.num_heads, length, c.head_dim).transpose(0, 1).reshape(length, -1)  # [T, Q*D]
            return _projection(out, w.o_proj, w.o_bias, w.o_int4)
        scores = torch.matmul(q, keys.transpose(1, 2)) * self.scale  # [K, group*T, S]
        scores = scores.view(c.num_kv_heads, group, length, -1)
        if mask is not None:
            scores = scores + mask
        if w.sinks is None:
            probs = F.softmax(scores, dim=-1)  # in float32 inside the kernel, rounded once to q's dtype on the way out
        else:  # GPT-OSS
            probs = softmax_with_sinks(scores, w.sinks.view(c.num_kv_heads, group)).to(q.dtype)
        out = torch.matmul(probs.view(c.num_kv_heads, group * length, -1), values)  # [K, group*T, D]
        out = out.view(c.num_heads, length, c.head_dim).transpose(0, 1).reshape(length, -1)  # [T, Q*D]
        return _projection(out, w.o_proj, w.o_bias, w.o_int4)

    def _fused_decode(self, heads: torch.Tensor, rows: torch.Tensor, layer: int, start: torch.Tensor, kv: KVCache,
                      window: int | None) -> torch.Tensor:
        """heads [1, Q+2K, D] (the qkv row, q and k normed) -> [1, Q*D] before o_proj, through
        kernels/decode_attention.py: rotary and the cache write in place, then attention over the
        positions the token sees (start, a device tensor [1], read on the device)."""
        c = self.config
        if kv.decode_partials is None:  # sized by the capacity: the kernels' grid is fixed for CUDA graphs
            kv.decode_partials = self.decode_attention.Partials(c.num_heads, c.head_dim, kv.capacity, kv.stacked.device)
        return self.decode_attention.decode_attention(heads, rows, kv.stacked[layer], start, kv.decode_partials,
                                                      num_heads=c.num_heads, window=window, scale=self.scale,
                                                      rotary_dim=self.rotary.dim)

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The prompt path's FFN of a layer: h [T, H], the residual after attention -> [T, H]."""
        weights = self.weights.layers[layer]
        if weights.router is None:  # a dense layer
            return gated_ffn(rms_norm(h, weights.post_attention_norm, self.config.rms_norm_eps),
                             weights.dense_w13, weights.dense_w2)
        return self.moe.forward(layer, h)

    def _mask(self, start: int | torch.Tensor, length: int, total: int, window: int | None, *,
              out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Additive [T, S] mask: causal, and the layer's sliding window if it has one (Mistral's
        on every layer, GPT-OSS's on alternate layers). `out`: a [T, S] buffer to write it into."""
        static = isinstance(start, torch.Tensor)  # the whole KV capacity is attended: mask past `start`
        if length == 1 and not static and (window is None or total <= window):
            return None
        query_pos = (start if static else torch.arange(start, start + length, device=self.device))[:, None]
        key_pos = torch.arange(total, device=self.device)[None, :]
        blocked = key_pos > query_pos  # [T, S]: the positions after the query's
        if window is not None:
            blocked |= key_pos <= query_pos - window  # and those that left its window
        mask = torch.zeros(blocked.shape, device=self.device, dtype=self.dtype) if out is None else out.zero_()
        return mask.masked_fill_(blocked, torch.finfo(self.dtype).min)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, kv: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """The prompt path: tokens [T] at positions start.. -> logits [T, V] (all_logits) or
        [1, V] (last), float32. Decode steps go through decoder.py instead."""
        c, w = self.config, self.weights
        x = F.embedding(tokens, w.embed)  # [T, H]
        for layer, lw in enumerate(w.layers):
            h = x + self.attention(rms_norm(x, lw.input_norm, c.rms_norm_eps), layer, start, kv)
            x = h + self.ffn(layer, h)
        self.moe.flush_counts()  # the grouped layers' hits (one small read-back, the work all issued)
        if not all_logits:
            x = x[-1:]
        return F.linear(rms_norm(x, w.norm, c.rms_norm_eps), w.lm_head).float()


def _projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, int4) -> torch.Tensor:
    """x [T, I] @ weight.T (+ bias): one decode token through the 4-bit codes where the layer
    keeps them (LayerWeights.qkv_int4, o_int4: kernels/int4_linear.py), else the weight."""
    if x.shape[0] == 1 and int4 is not None:
        projected = int4(x)
        return projected if bias is None else projected + bias
    return F.linear(x, weight, bias)
