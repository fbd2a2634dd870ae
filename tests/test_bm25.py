"""BM25 scores against a hand computation."""

import math

import numpy as np

from clara_jax.data.bm25 import BM25, tokenize


def test_scores_match_hand_computation():
  texts = ["river stone river", "stone city", "blue falcon team"]
  bm = BM25(texts, k1=0.9, b=0.4)
  avg = (3 + 2 + 3) / 3
  idf = lambda df: math.log1p((3 - df + 0.5) / (df + 0.5))

  def term(tf, length, df):
    return idf(df) * tf * 1.9 / (tf + 0.9 * (0.6 + 0.4 * length / avg))

  want = [term(2, 3, 1) + term(1, 3, 2), term(1, 2, 2), 0.0]
  np.testing.assert_allclose(bm.scores("the river stone"), want, rtol=1e-12)
  assert bm.top_n("river stone", 2) == [0, 1]
  assert bm.top_n("river stone", 2, exclude={0}) == [1, 2]
  assert tokenize("The River, a stone!") == ["river", "stone"]
  assert bm.top_n("unknown words", 3) == [0, 1, 2]  # all zero: index order
