"""Okapi BM25 over a list of texts, with scipy.sparse so scoring every document for a
query is one sparse product. Used for converter distractors and the retrieval baseline.

Tokenizer: lowercase alphanumeric words minus a small English stopword list. Scores use
the Lucene idf, log(1 + (N - df + 0.5) / (df + 0.5)), which is never negative.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import scipy.sparse as sp

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
  """a an and are as at be by for from has he in is it its of on or that
the to was were will with this which who what when where how did does do""".split()
)


def tokenize(text: str) -> List[str]:
  return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


class BM25:
  """`BM25(texts).scores(query)` -> np.ndarray [num_texts]."""

  def __init__(self, texts: Sequence[str], k1: float = 0.9, b: float = 0.4):
    self.k1, self.b = k1, b
    docs = [tokenize(t) for t in texts]
    self.vocab: Dict[str, int] = {}
    rows: List[int] = []
    cols: List[int] = []
    vals: List[int] = []
    for i, words in enumerate(docs):
      counts: Dict[int, int] = {}
      for w in words:
        j = self.vocab.setdefault(w, len(self.vocab))
        counts[j] = counts.get(j, 0) + 1
      rows.extend([i] * len(counts))
      cols.extend(counts)
      vals.extend(counts.values())
    n = len(docs)
    tf = sp.csr_matrix(
      (np.asarray(vals, np.float64), (rows, cols)), shape=(n, max(len(self.vocab), 1))
    )
    lengths = np.asarray([len(d) for d in docs], np.float64)
    avg = lengths.mean() if n and lengths.mean() > 0 else 1.0
    df = np.bincount(tf.indices, minlength=tf.shape[1]).astype(np.float64)
    self.idf = np.log1p((n - df + 0.5) / (df + 0.5))
    # Precompute each (doc, term) weight: idf * tf (k1 + 1) / (tf + k1 (1 - b + b len/avg)).
    norm = k1 * (1 - b + b * lengths / avg)
    tf = tf.tocoo()
    weights = tf.data * (k1 + 1) / (tf.data + norm[tf.row]) * self.idf[tf.col]
    self.weights = sp.csr_matrix((weights, (tf.row, tf.col)), shape=tf.shape)

  def _query_vector(self, query: str) -> np.ndarray:
    vec = np.zeros(self.weights.shape[1])
    for w in tokenize(query):
      j = self.vocab.get(w)
      if j is not None:
        vec[j] += 1.0
    return vec

  def scores(self, query: str) -> np.ndarray:
    return self.weights @ self._query_vector(query)

  def top_n(self, query: str, n: int, exclude: Optional[Iterable[int]] = None) -> List[int]:
    """Indices of the n best documents, ties broken by lower index; `exclude` skipped."""
    scores = self.scores(query)
    if exclude:
      scores = scores.copy()
      scores[list(exclude)] = -np.inf
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[:n] if np.isfinite(scores[i])]
