"""Retrieval baselines on a question's own candidates: what could score without the
reasoner, computed on exactly the candidates the reasoner ranks.

* `random`: a uniform ranking, as its exact expected Recall@k (min(1, k / N) per gold).
* `kind_prior`: a uniform ranking of the candidates of the gold's kind, then the rest,
  as its exact expectation: what knowing the answer's *type* alone gives.
* `bm25`: BM25 of the question over the candidates.
* `bm25_kind`: BM25 restricted to the candidates of the gold's kind (then the rest).
* `bm25_two_hop`: the classic iterative baseline: BM25's top-1 document is the first
  hop; the question plus that document's text ranks the other candidates, and the first
  hop's document comes last (it is what the second hop leads away from).
* `gold_prior`: candidates ranked by how often each is the gold of a training question
  (a popularity prior a trained retriever could learn without reading the question).

A baseline yields {at: Recall@at} per question; rankings break ties by candidate order.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from clara_jax.data.bm25 import BM25
from clara_jax.eval.answer_metrics import recall_at_k

BASELINES = ("random", "kind_prior", "bm25", "bm25_kind", "bm25_two_hop", "gold_prior")


def _rank(scores: Sequence[float] | np.ndarray) -> List[int]:
  return [int(i) for i in np.argsort(-np.asarray(scores, np.float64), kind="stable")]


def bm25_ranking(question: str, docs: Sequence[str]) -> List[int]:
  return _rank(BM25(list(docs)).scores(question))


def kind_first(ranking: Sequence[int], doc_kinds: Sequence[str], kind: str) -> List[int]:
  """`ranking` with the candidates of `kind` moved before the others, order kept."""
  return [i for i in ranking if doc_kinds[i] == kind] + [i for i in ranking if doc_kinds[i] != kind]


def two_hop_ranking(question: str, docs: Sequence[str]) -> List[int]:
  first = bm25_ranking(question, docs)[0]
  scores = BM25(list(docs)).scores(f"{question} {docs[first]}")
  return [i for i in _rank(scores) if i != first] + [first]


def _expected_uniform(num_pool: int, positives_in_pool: int, num_positives: int, at: int) -> float:
  """Expected Recall@at of a uniform ranking of a pool that holds `positives_in_pool` of
  the question's `num_positives` golds, the pool ranked before everything else."""
  if num_positives == 0 or num_pool == 0:
    return 0.0
  return positives_in_pool * min(1.0, at / num_pool) / num_positives


def recalls(
  row: Mapping, at: Sequence[int], gold_counts: Optional[Mapping[str, int]] = None
) -> Dict[str, Dict[int, float]]:
  """{baseline: {at: Recall@at}} for one row (stage2 fields; `doc_kinds` enables the
  kind baselines, `doc_ids` with `gold_counts` the gold prior)."""
  docs, pos = row["docs"], list(row["pos_index"])
  out: Dict[str, Dict[int, float]] = {
    "random": {a: _expected_uniform(len(docs), len(pos), len(pos), a) for a in at}
  }
  bm25 = bm25_ranking(row["question"], docs)
  out["bm25"] = {a: recall_at_k(bm25, pos, a) for a in at}
  out["bm25_two_hop"] = {a: recall_at_k(two_hop_ranking(row["question"], docs), pos, a) for a in at}
  kinds = row.get("doc_kinds")
  if kinds and pos:
    gold_kind = kinds[pos[0]]
    pool = [i for i, k in enumerate(kinds) if k == gold_kind]
    in_pool = sum(1 for p in pos if kinds[p] == gold_kind)
    # Golds of another kind (several golds) are ranked after the pool, as in kind_first.
    out["kind_prior"] = {a: _expected_uniform(len(pool), in_pool, len(pos), a) for a in at}
    ranking = kind_first(bm25, kinds, gold_kind)
    out["bm25_kind"] = {a: recall_at_k(ranking, pos, a) for a in at}
  if gold_counts is not None and row.get("doc_ids"):
    ranking = _rank([gold_counts.get(d, 0) for d in row["doc_ids"]])
    out["gold_prior"] = {a: recall_at_k(ranking, pos, a) for a in at}
  return out


def gold_counts_of(rows: Sequence[Mapping]) -> Dict[str, int]:
  """{doc id: number of rows whose gold it is} over rows with `doc_ids` (the training
  file of the `gold_prior` baseline)."""
  counts: Dict[str, int] = {}
  for row in rows:
    ids = row.get("doc_ids") or []
    for p in row["pos_index"]:
      if p < len(ids):
        counts[ids[p]] = counts.get(ids[p], 0) + 1
  return counts
