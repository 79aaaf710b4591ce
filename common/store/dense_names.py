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
    return name.startswith("layers.") and ".attn." in name
