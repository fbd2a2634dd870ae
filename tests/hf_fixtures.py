"""Keyword arguments of tiny Hugging Face decoder configs, shared by the import and
export tests (transformers builds the reference models from them, locally)."""


def tiny_sizes(
  hidden_size: int = 32,
  num_hidden_layers: int = 2,
  num_attention_heads: int = 4,
  num_key_value_heads: int = 2,
) -> dict:
  """The sizes of a tiny decoder, its MLP twice as wide as its hidden state."""
  return dict(
    hidden_size=hidden_size,
    intermediate_size=2 * hidden_size,
    num_hidden_layers=num_hidden_layers,
    num_attention_heads=num_attention_heads,
    num_key_value_heads=num_key_value_heads,
  )


def parity_config(vocab_size: int, hidden_size: int) -> dict:
  """A tiny decoder for logit-parity tests."""
  return dict(
    vocab_size=vocab_size,
    **tiny_sizes(hidden_size),
    max_position_embeddings=64,
    # Larger than HF's 0.02 so attention is sharp: with near-uniform attention a
    # wrong RoPE or mask would barely move the logits.
    initializer_range=0.15,
  )
