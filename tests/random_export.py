"""A tiny model's export with random weights drawn straight from the parameter shapes:
something to load, with no init program to compile and nothing to train."""

import json
import os

import numpy as np

WORDS = "red blue green river stone city team coach mayor north south marsh".split()


def tiny_random_model(rng: np.random.Generator):
  """(a tokenizer trained on random sentences of WORDS, the tiny model's config for it,
  its parameters as {'/'-path: numpy array} of N(0, 0.02) values), all drawn from `rng`."""
  import flax.linen as nn
  from flax import traverse_util

  from clara_jax.data.tokenizer import Tokenizer
  from clara_jax.model.config import model_config
  from clara_jax.model.decoder import abstract_params

  tok = Tokenizer.train(
    [" ".join(rng.choice(WORDS, 10)) for _ in range(200)], vocab_size=300, num_mem_tokens=4
  )
  cfg = model_config("tiny", base_vocab_size=tok.base_vocab_size, num_extra_tokens=tok.num_special)
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)), sep="/")
  flat = {k: rng.normal(0, 0.02, a.shape).astype(a.dtype) for k, a in flat.items()}
  return tok, cfg, flat


def write_export(out: str, cfg, flat_params, tok) -> None:
  """An export directory: the parameters, the tokenizer and the CLaRa lengths (documents
  of 16 tokens at compression rate 4, questions of 8)."""
  import jax
  from flax import traverse_util

  from clara_jax.weights.export import save_params

  save_params(out, cfg, jax.device_put(traverse_util.unflatten_dict(flat_params, sep="/")))
  tok.save(os.path.join(out, "tokenizer.model"))
  with open(os.path.join(out, "clara.json"), "w") as f:
    json.dump({"doc_max_length": 16, "compr_rate": 4, "question_max_length": 8}, f)
