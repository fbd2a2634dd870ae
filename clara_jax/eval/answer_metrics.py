"""Answer and retrieval metrics with the reference's normalisation.

Normalisation: "True"/"False" -> "yes"/"no", lowercase, strip ASCII punctuation, drop
the articles a/an/the, collapse whitespace (SQuAD style). EM and F1 take the best over
all gold aliases (the reference scores only the first alias; with one alias they agree).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Dict, Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_BOOL = {"True": "yes", "False": "no"}


def normalize_answer(text: str) -> str:
  text = _BOOL.get(text.strip(), text)
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
  pred, ref = normalize_answer(prediction), normalize_answer(gold)
  special = {"yes", "no", "noanswer"}
  if (pred in special or ref in special) and pred != ref:
    return 0.0
  p_tokens, r_tokens = pred.split(), ref.split()
  common = collections.Counter(p_tokens) & collections.Counter(r_tokens)
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(p_tokens), overlap / len(r_tokens)
  return 2 * precision * recall / (precision + recall)


def cover_exact_match(prediction: str, gold: str) -> float:
  """1 if every normalised gold token appears among the prediction's tokens."""
  pred = set(normalize_answer(prediction).split())
  ref = normalize_answer(gold).split()
  return float(bool(ref) and all(t in pred for t in ref))


def answer_scores(prediction: str, golds: Sequence[str]) -> Dict[str, float]:
  """EM, F1 and Cover EM, each the best over the gold aliases."""
  if not golds:
    raise ValueError("no gold answer to score against")
  return {
    "em": max(exact_match(prediction, g) for g in golds),
    "f1": max(token_f1(prediction, g) for g in golds),
    "cover_em": max(cover_exact_match(prediction, g) for g in golds),
  }


def recall_at_k(ranked: Iterable[int], positives: Iterable[int], k: int) -> float:
  """Hits among the top-k / number of positives (0 for a question without positives,
  which still counts, as in the reference's evaluation)."""
  pos = set(positives)
  if not pos:
    return 0.0
  return len(pos & set(list(ranked)[:k])) / len(pos)
