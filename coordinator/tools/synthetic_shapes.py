"""The model shapes `make-synthetic` knows, by name: plain numbers, no torch.

Knows only the hyper-parameters of each shape (Mixtral config field names); writing a store of
that shape is `synthetic.py`'s job. Kept apart so that `python -m coordinator make-synthetic
--help` can list the names without importing torch."""

SHAPES = {
    # Mixtral-8x7B: 32 layers x 8 experts, hidden 4096, expert FFN 14336, 32 heads / 8 KV heads.
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rope_theta=1e6),
    # Small enough for CI, big enough that blobs are not trivial.
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=4096, rope_theta=1e6),
}
