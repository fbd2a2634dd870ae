"""Answer metrics on hand-made cases."""

import pytest

from clara_jax.eval.answer_metrics import (
  answer_scores,
  cover_exact_match,
  exact_match,
  normalize_answer,
  recall_at_k,
  token_f1,
)


def test_normalization():
  assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
  assert normalize_answer("An apple, a pear") == "apple pear"
  assert normalize_answer("True") == "yes" and normalize_answer("False") == "no"


def test_exact_match_and_f1():
  assert exact_match("the Beatles", "Beatles") == 1.0
  assert exact_match("Beatles band", "Beatles") == 0.0
  assert token_f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
  assert token_f1("no", "yes") == 0.0
  assert token_f1("yes", "True") == 1.0
  assert token_f1("", "x") == 0.0


def test_cover_em_and_aliases():
  assert cover_exact_match("It was born in New York City", "New York") == 1.0
  assert cover_exact_match("New Jersey", "New York") == 0.0
  scores = answer_scores("NYC", ["New York City", "NYC"])
  assert scores == {"em": 1.0, "f1": 1.0, "cover_em": 1.0}
  with pytest.raises(ValueError):
    answer_scores("x", [])


def test_recall_at_k():
  assert recall_at_k([3, 1, 4, 0], [1, 0], 1) == 0.0
  assert recall_at_k([3, 1, 4, 0], [1, 0], 3) == 0.5
  assert recall_at_k([3, 1, 4, 0], [1, 0], 5) == 1.0
  assert recall_at_k([3, 1], [], 1) == 0.0
