"""The Mixtral forward pass, written out: embedding, RMSNorm, rotary attention with grouped KV
heads and a static KV cache, the sparse MoE block, final norm and LM head.

It holds only the dense weights (on the device). Experts come from an ExpertProvider (the GPU
expert cache), so this file knows nothing of slots, sources or prefetching; `moe.py` is where
routing meets the cache. `Transformer.forward` is the prompt path (many tokens at once); the
decode step (one token) is decoder.py, which reuses `attention` and the MoE block's routing.

Dimension legend: T = tokens in this step, S = positions held in the KV cache, H = hidden size,
Q = query heads, K = key/value heads, D = head dim, V = vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.model_config import ModelConfig
from common.quantization import QuantizedMatrix, QuantSpec
from common.store import dense_names

from .moe import MoEBlock
from .rms_norm import rms_norm


class RotaryEmbedding:
    """cos/sin tables for every position, computed as transformers does (float32), cast once."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)

    def apply(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """x [heads, T, D] at positions start..start+T-1 (or one token at a position held in a
        device tensor [1], for CUDA graphs)."""
        if isinstance(start, torch.Tensor):
            cos, sin = self.cos.index_select(0, start), self.sin.index_select(0, start)  # [1, D]
        else:
            length = x.shape[-2]
            cos, sin = self.cos[start : start + length], self.sin[start : start + length]  # [T, D]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class KVCache:
    """Keys and values of one sequence, preallocated for `capacity` positions."""

    def __init__(self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)  # [L, K, S, D]
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity

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


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    q_proj: torch.Tensor  # [Q*D, H]
    k_proj: torch.Tensor  # [K*D, H]
    v_proj: torch.Tensor  # [K*D, H]
    o_proj: torch.Tensor  # [H, Q*D]
    router: torch.Tensor  # [E, H]


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    layers: list[LayerWeights]

    @classmethod
    def from_store_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        config: ModelConfig,
        dense_quant: QuantSpec,
        device: torch.device,
        dtype: torch.dtype,
    ) -> "DenseWeights":
        def plain(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype)

        def projection(name: str) -> torch.Tensor:
            if name in tensors:
                return plain(name)
            # 4-bit attention is dequantized once at load: it is small next to the experts.
            return QuantizedMatrix.from_tensors(tensors, name, dense_quant).dequantize(torch.float32).to(device=device, dtype=dtype)

        embed = plain(dense_names.EMBED)
        lm_head = embed if config.tie_word_embeddings else plain(dense_names.LM_HEAD)
        layers = [
            LayerWeights(
                input_norm=plain(dense_names.input_norm(l)),
                post_attention_norm=plain(dense_names.post_attention_norm(l)),
                q_proj=projection(dense_names.attention(l, "q_proj")),
                k_proj=projection(dense_names.attention(l, "k_proj")),
                v_proj=projection(dense_names.attention(l, "v_proj")),
                o_proj=projection(dense_names.attention(l, "o_proj")),
                router=plain(dense_names.router(l)),
            )
            for l in range(config.num_layers)
        ]
        return cls(embed, plain(dense_names.FINAL_NORM), lm_head, layers)

    def nbytes(self) -> int:
        """Device bytes of the dense weights (the tied LM head counted once)."""
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_attention_norm, layer.q_proj, layer.k_proj, layer.v_proj,
                        layer.o_proj, layer.router]
        return sum(t.numel() * t.element_size() for t in tensors)


class Transformer:
    def __init__(self, config: ModelConfig, weights: DenseWeights, moe: MoEBlock, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.weights = weights
        self.moe = moe
        self.device = device
        self.dtype = dtype
        self.rotary = RotaryEmbedding(config, device, dtype)
        self.scale = config.head_dim**-0.5

    def attention(self, x: torch.Tensor, layer: int, start: int | torch.Tensor, kv: KVCache) -> torch.Tensor:
        """x [T, H] (normed) -> [T, H]. `start` may be a device tensor [1] (one token, CUDA graphs)."""
        c, w = self.config, self.weights.layers[layer]
        length = x.shape[0]
        q = F.linear(x, w.q_proj).view(length, c.num_heads, c.head_dim).transpose(0, 1)  # [Q, T, D]
        k = F.linear(x, w.k_proj).view(length, c.num_kv_heads, c.head_dim).transpose(0, 1)  # [K, T, D]
        v = F.linear(x, w.v_proj).view(length, c.num_kv_heads, c.head_dim).transpose(0, 1)  # [K, T, D]
        q, k = self.rotary.apply(q, start), self.rotary.apply(k, start)
        keys, values = kv.update(layer, start, k, v)  # [K, S, D]
        group = c.num_heads // c.num_kv_heads
        q = q.reshape(c.num_kv_heads, group * length, c.head_dim)  # query heads of one KV head side by side
        scores = torch.matmul(q, keys.transpose(1, 2)) * self.scale  # [K, group*T, S]
        scores = scores.view(c.num_kv_heads, group, length, -1)
        mask = self._mask(start, length, keys.shape[1])
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs.view(c.num_kv_heads, group * length, -1), values)  # [K, group*T, D]
        out = out.view(c.num_heads, length, c.head_dim).transpose(0, 1).reshape(length, -1)  # [T, Q*D]
        return F.linear(out, w.o_proj)

    def _mask(self, start: int | torch.Tensor, length: int, total: int) -> torch.Tensor | None:
        """Additive [T, S] mask: causal, and Mistral's sliding window if the model has one."""
        window = self.config.sliding_window
        static = isinstance(start, torch.Tensor)  # the whole KV capacity is attended: mask past `start`
        if length == 1 and not static and (window is None or total <= window):
            return None
        query_pos = (start if static else torch.arange(start, start + length, device=self.device))[:, None]
        key_pos = torch.arange(total, device=self.device)[None, :]
        allowed = key_pos <= query_pos
        if window is not None:
            allowed &= key_pos > query_pos - window
        mask = torch.zeros(allowed.shape, device=self.device, dtype=self.dtype)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, kv: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """The prompt path: tokens [T] at positions start.. -> logits [T, V] (all_logits) or
        [1, V] (last), float32. Decode steps go through decoder.py instead."""
        c, w = self.config, self.weights
        x = F.embedding(tokens, w.embed)  # [T, H]
        for layer, lw in enumerate(w.layers):
            h = x + self.attention(rms_norm(x, lw.input_norm, c.rms_norm_eps), layer, start, kv)
            x = h + self.moe.forward(layer, h)
        if not all_logits:
            x = x[-1:]
        return F.linear(rms_norm(x, w.norm, c.rms_norm_eps), w.lm_head).float()
