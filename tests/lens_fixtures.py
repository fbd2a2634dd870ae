"""The lens tests' small real tokenizer and their look-up of a word's vocabulary id."""

from typing import List, Sequence

import numpy as np

from clara_jax.data.tokenizer import Tokenizer


def train_tokenizer(words: Sequence[str], sentences: int) -> Tokenizer:
  """A 420-piece tokenizer trained on `sentences` seeded random sentences of `words`."""
  rng = np.random.default_rng(0)
  return Tokenizer.train(
    [" ".join(rng.choice(words, 10)) for _ in range(sentences)], vocab_size=420, num_mem_tokens=4
  )


def piece_ids(tok: Tokenizer, text: str) -> List[int]:
  """Vocabulary ids of the whole-word pieces ("\u2581word") of each word of `text`."""
  pieces = {tok.id_to_piece(i): i for i in range(tok.base_vocab_size)}
  return [pieces["\u2581" + w] for w in text.split()]
