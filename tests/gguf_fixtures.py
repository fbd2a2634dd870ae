"""A tiny random llama-architecture GGUF file with a byte-level BPE tokenizer (ChatML
control tokens, a few merges) in its metadata: a pretrained base for pipeline tests that
imports in a second and trains at the `tiny` model's speed."""

import gguf
import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t")


def _byte_alphabet():
  from tokenizers import pre_tokenizers

  return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tiny_gguf(
  path: str,
  seed: int = 0,
  layers: int = 2,
  hidden: int = 64,
  heads: int = 4,
  kv_heads: int = 2,
  ffn: int = 128,
) -> str:
  """Writes the file (F32 tensors, untied output head) and returns `path`."""
  tokens = list(SPECIALS) + _byte_alphabet()
  tokens += ["".join(m.split(" ")) for m in MERGES]
  vocab = len(tokens)
  rng = np.random.default_rng(seed)
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_name("tiny random llama")
  writer.add_block_count(layers)
  writer.add_context_length(512)
  writer.add_embedding_length(hidden)
  writer.add_feed_forward_length(ffn)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_dimension_count(hidden // heads)
  writer.add_vocab_size(vocab)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
  writer.add_token_merges(list(MERGES))
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  head_dim = hidden // heads
  shapes = {
    "token_embd.weight": (vocab, hidden),
    "output.weight": (vocab, hidden),
    "output_norm.weight": (hidden,),
  }
  for i in range(layers):
    shapes.update(
      {
        f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
        f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
        f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
        f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
        f"blk.{i}.ffn_gate.weight": (ffn, hidden),
        f"blk.{i}.ffn_up.weight": (ffn, hidden),
        f"blk.{i}.ffn_down.weight": (hidden, ffn),
        f"blk.{i}.attn_norm.weight": (hidden,),
        f"blk.{i}.ffn_norm.weight": (hidden,),
      }
    )
  for name, shape in sorted(shapes.items()):
    value = (np.ones(shape) if len(shape) == 1 else rng.normal(0.0, 0.05, shape)).astype(np.float32)
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
