"""The dense weights on the device: embeddings, norms, attention, routers, and what some
families add (attention biases, q/k norms, router biases, shared experts, dense layers' FFNs,
attention sinks),
read from the store's dense.safetensors by the names of common/store/dense_names.py. Also the
two small FFNs that run on them (a dense layer's, a shared expert's). Knows nothing of experts,
caches or sources.

Dimension legend: T = tokens, H = hidden size, Q = query heads, K = key/value heads, D = head dim,
E = experts per layer, S = shared expert width, F' = dense FFN width, V = vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.model_config import ModelConfig
from common.quantization import QuantizedMatrix, QuantSpec
from common.store import dense_names

from .kernels import int4_linear
from .kernels.int4_linear import Int4Linear
from .latent_attention import LatentWeights


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    q_proj: torch.Tensor | None  # [Q*D, H]; None with latent attention (then `latent`)
    k_proj: torch.Tensor | None  # [K*D, H]
    v_proj: torch.Tensor | None  # [K*D, H]
    o_proj: torch.Tensor  # [H, Q*D] (latent attention: [H, Q*v_head_dim])
    router: torch.Tensor | None  # [E, H]; None in a dense layer
    # what some families add (None where the model has none)
    q_bias: torch.Tensor | None = None  # [Q*D]
    k_bias: torch.Tensor | None = None  # [K*D]
    v_bias: torch.Tensor | None = None  # [K*D]
    q_norm: torch.Tensor | None = None  # [D] per head, or [Q*D] over the projection
    k_norm: torch.Tensor | None = None  # [D] or [K*D]
    router_bias: torch.Tensor | None = None  # [E]
    shared_w13: torch.Tensor | None = None  # [2S, H]: the shared expert's gate and up
    shared_w2: torch.Tensor | None = None  # [H, S]
    shared_gate: torch.Tensor | None = None  # [1, H]
    dense_w13: torch.Tensor | None = None  # [2F', H]: a dense layer's FFN
    dense_w2: torch.Tensor | None = None  # [H, F']
    latent: LatentWeights | None = None  # multi-head latent attention's own weights (DeepSeek-V3)
    o_bias: torch.Tensor | None = None  # [H]
    sinks: torch.Tensor | None = None  # [Q]: each query head's attention sink logit, float32 (from the model's dtype)
    router_logit_bias: torch.Tensor | None = None  # [E]: added to the router's logits (topk_softmax)
    qkv_proj: torch.Tensor | None = None  # [(Q+2K)*D, H]: q, k and v stacked (then those three are None)
    qkv_bias: torch.Tensor | None = None  # [(Q+2K)*D]
    qkv_widths: tuple[int, int, int] | None = None  # (Q*D, K*D, K*D): where qkv_proj's output splits
    qk_norm_rows: torch.Tensor | None = None  # [Q+K, D]: q_norm per query head, k_norm per key head (stack_qk_norms)
    # one decode token's qkv and o projections read as 4-bit codes (kernels/int4_linear.py), where
    # the store quantizes them and the engine asks (CUDA, bf16); the prompt keeps the weights above
    qkv_int4: Int4Linear | None = None
    o_int4: Int4Linear | None = None

    def fuse_qkv(self) -> None:
        """Stack q, k and v into one weight: one matmul instead of three per layer (a decode
        step is bound by its kernel count on a fast GPU). Biases are stacked when all three have
        one; with some but not all, the projections stay apart."""
        biases = (self.q_bias, self.k_bias, self.v_bias)
        if self.q_proj is None or (any(b is None for b in biases) and any(b is not None for b in biases)):
            return
        self.qkv_widths = (self.q_proj.shape[0], self.k_proj.shape[0], self.v_proj.shape[0])
        self.qkv_proj = torch.cat([self.q_proj, self.k_proj, self.v_proj])
        self.qkv_bias = None if self.q_bias is None else torch.cat(biases)
        self.q_proj = self.k_proj = self.v_proj = self.q_bias = self.k_bias = self.v_bias = None

    def stack_qk_norms(self, query_heads: int, key_heads: int) -> None:
        """With per-head q/k norms and one qkv weight: one weight row per head of q and k, so
        that one RMSNorm over the [Q+K, D] heads, side by side in the qkv output, does both."""
        if self.qkv_proj is None or self.q_norm is None:
            return
        self.qk_norm_rows = torch.cat([self.q_norm.expand(query_heads, -1), self.k_norm.expand(key_heads, -1)])

    def tensors(self) -> list[torch.Tensor]:
        own = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        int4 = [t for linear in (self.qkv_int4, self.o_int4) if linear is not None for t in linear.tensors()]
        return own + int4 + (self.latent.tensors() if self.latent is not None else [])


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
        *,
        int4_decode: bool = False,
    ) -> "DenseWeights":
        """`int4_decode`: also keep 4-bit q/k/v and o projections as codes for decode tokens
        (int4_linear.Int4Linear, CUDA only), where they are stored so and it takes them."""
        quantized: dict[str, QuantizedMatrix] = {}  # the projections stored quantized, by name

        def plain(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype)

        def optional(name: str) -> torch.Tensor | None:
            return plain(name) if name in tensors else None

        def projection(name: str) -> torch.Tensor:
            if name in tensors:
                return plain(name)
            # 4-bit attention is dequantized once at load: it is small next to the experts.
            quantized[name] = QuantizedMatrix.from_tensors(tensors, name, dense_quant)
            return quantized[name].dequantize(torch.float32).to(device=device, dtype=dtype)

        embed = plain(dense_names.EMBED)
        lm_head = embed if config.tie_word_embeddings else plain(dense_names.LM_HEAD)
        dense = set(config.dense_layers)
        grouped = config.attention == "grouped"
        layers = [
            LayerWeights(
                input_norm=plain(dense_names.input_norm(l)),
                post_attention_norm=plain(dense_names.post_attention_norm(l)),
                q_proj=projection(dense_names.attention(l, "q_proj")) if grouped else None,
                k_proj=projection(dense_names.attention(l, "k_proj")) if grouped else None,
                v_proj=projection(dense_names.attention(l, "v_proj")) if grouped else None,
                o_proj=projection(dense_names.attention(l, "o_proj")),
                router=None if l in dense else plain(dense_names.router(l)),
                q_bias=optional(dense_names.attention_bias(l, "q_proj")),
                k_bias=optional(dense_names.attention_bias(l, "k_proj")),
                v_bias=optional(dense_names.attention_bias(l, "v_proj")),
                q_norm=optional(dense_names.q_norm(l)),
                k_norm=optional(dense_names.k_norm(l)),
                router_bias=optional(dense_names.router_bias(l)),
                shared_w13=optional(dense_names.shared_expert(l, "w13")),
                shared_w2=optional(dense_names.shared_expert(l, "w2")),
                shared_gate=optional(dense_names.shared_expert_gate(l)),
                dense_w13=optional(dense_names.dense_ffn(l, "w13")),
                dense_w2=optional(dense_names.dense_ffn(l, "w2")),
                latent=None if grouped else LatentWeights.load(l, config, plain, projection),
                o_bias=optional(dense_names.attention_bias(l, "o_proj")),
                sinks=optional(dense_names.attention_sinks(l)),
                router_logit_bias=optional(dense_names.router_logit_bias(l)),
            )
            for l in range(config.num_layers)
        ]
        for l, layer in enumerate(layers):
            layer.fuse_qkv()
            if int4_decode and layer.qkv_proj is not None:
                _keep_int4(layer, [quantized.get(dense_names.attention(l, n)) for n in ("q_proj", "k_proj", "v_proj")],
                           quantized.get(dense_names.attention(l, "o_proj")), device, dtype)
            if config.qk_norm == "head":
                layer.stack_qk_norms(config.num_heads, config.num_kv_heads)
            if layer.sinks is not None:  # in the model's dtype, then float32 once (the softmax's): no cast per step
                layer.sinks = layer.sinks.float()
        return cls(embed, plain(dense_names.FINAL_NORM), lm_head, layers)

    def nbytes(self) -> int:
        """Device bytes of the dense weights (the tied LM head counted once)."""
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += layer.tensors()
        return sum(t.numel() * t.element_size() for t in tensors)


def _keep_int4(layer: LayerWeights, qkv: list[QuantizedMatrix | None], o: QuantizedMatrix | None,
               device: torch.device, dtype: torch.dtype) -> None:
    """The layer's stacked qkv and its o as Int4Linear, each where all its parts are stored at
    4 bits and tinygemm takes them (int4_linear.supports); else that one stays bf16 only."""
    if all(m is not None for m in qkv) and int4_linear.supports(qkv, dtype):
        layer.qkv_int4 = int4_linear.Int4Linear(qkv, device)
    if o is not None and int4_linear.supports([o], dtype):
        layer.o_int4 = int4_linear.Int4Linear([o], device)


def gated_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The SiLU-gated FFN of a dense layer or a shared expert: x [T, H] -> [T, H], written into
    `out` where given (the same product as F.linear's: x @ w2.T, no bias)."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # [T, F] each
    hidden = F.silu(gate) * up
    return F.linear(hidden, w2) if out is None else torch.matmul(hidden, w2.t(), out=out)


def shared_expert(x: torch.Tensor, weights: LayerWeights, *, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The shared expert's output for the normed MoE input x [T, H] (None where there is none),
    written into `out` where given."""
    if weights.shared_w13 is None:
        return None
    if weights.shared_gate is None:
        return gated_ffn(x, weights.shared_w13, weights.shared_w2, out=out)
    return torch.mul(gated_ffn(x, weights.shared_w13, weights.shared_w2),
                     torch.sigmoid(F.linear(x, weights.shared_gate)), out=out)  # [T, H] * [T, 1]
