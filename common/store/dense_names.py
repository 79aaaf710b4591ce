"""Names of the dense (non-expert) tensors inside dense.safetensors.

A projection stored unquantized is one tensor `NAME`; quantized it is `NAME.codes.p0`, ...,
`NAME.scale`, `NAME.zero` (see common/quantization.py)."""

EMBED = "embed_tokens"
FINAL_NORM = "norm"
LM_HEAD = "lm_head"  # absent when the model ties it to the embedding
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention(layer: int, projection: str) -> str:
    return f"layers.{layer}.attn.{projection}"


def input_norm(layer: int) -> str:
    return f"layers.{layer}.input_norm"


def post_attention_norm(layer: int) -> str:
    return f"layers.{layer}.post_attention_norm"


def router(layer: int) -> str:
    return f"layers.{layer}.router"


def is_attention(name: str) -> bool:
    """Whether a dense tensor name is one of the attention projections (the ones pack may quantize)."""
    return name.startswith("layers.") and ".attn." in name and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS


# What some families add (coordinator/families/); absent from stores that do not need them.

def attention_bias(layer: int, projection: str) -> str:
    return f"layers.{layer}.attn_bias.{projection}"


def q_norm(layer: int) -> str:
    return f"layers.{layer}.q_norm"


def k_norm(layer: int) -> str:
    return f"layers.{layer}.k_norm"


def router_bias(layer: int) -> str:
    """Added to the router's scores for choosing the experts only (sigmoid_grouped routers)."""
    return f"layers.{layer}.router_bias"


def router_logit_bias(layer: int) -> str:
    """Added to the router's logits before the top k: for the choice and the weights (topk_softmax)."""
    return f"layers.{layer}.router_logit_bias"


def attention_sinks(layer: int) -> str:
    """A learned logit per query head that joins each softmax (GPT-OSS)."""
    return f"layers.{layer}.attn_sinks"


def shared_expert(layer: int, matrix: str) -> str:
    """matrix: w13 ([gate; up], [2S, H]) or w2 (down, [H, S])."""
    return f"layers.{layer}.shared_expert.{matrix}"


def shared_expert_gate(layer: int) -> str:
    return f"layers.{layer}.shared_expert_gate"


def dense_ffn(layer: int, matrix: str) -> str:
    """The FFN of a dense layer; matrix: w13 ([gate; up]) or w2 (down)."""
    return f"layers.{layer}.mlp.{matrix}"


def latent_attention(layer: int, part: str) -> str:
    """Multi-head latent attention's own tensors (DeepSeek-V3); its o_proj is attention(layer,
    "o_proj"). part: q_a_proj, q_a_norm, q_b_proj (or q_proj without a q bottleneck), kv_a_proj
    ([latent; k_pe] from the hidden state), kv_a_norm, kv_b_proj (latent -> k_nope and v per head)."""
    return f"layers.{layer}.latent_attn.{part}"
