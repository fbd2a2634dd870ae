"""Intervals for the evaluation's claims: percentile bootstrap over questions.

Every difference the project calls a win is a paired difference on the same questions
(stage2 minus a baseline, real lens minus its permutation null), so the bootstrap
resamples questions and keeps each question's pair together. Seeded: the same inputs
give the same interval on every machine.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

NUM_RESAMPLES = 2000


def bootstrap_ci(values: Sequence[float], seed: int = 0, num_resamples: int = NUM_RESAMPLES,
                 level: float = 0.95) -> Optional[Dict[str, float]]:
  """{"mean", "lo", "hi", "n"}: the mean of `values` [Q] and the percentile bootstrap
  interval of that mean at `level`; None for no values. One value gives lo = hi = it."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if x.size == 0:
    return None
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, x.size, (num_resamples, x.size))].mean(axis=1)
  tail = (1.0 - level) / 2.0
  lo, hi = np.quantile(means, [tail, 1.0 - tail])
  return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(x.size)}


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0,
                      num_resamples: int = NUM_RESAMPLES) -> Optional[Dict[str, float]]:
  """Bootstrap interval of mean(a - b) over the questions where both are known; a and b
  [Q] are aligned per question (None marks a missing value)."""
  if len(a) != len(b):
    raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
  diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
  return bootstrap_ci(diffs, seed, num_resamples)


def format_ci(ci: Optional[Dict[str, float]], digits: int = 2, signed: bool = False) -> str:
  """'0.42 [0.35, 0.49]' (or '+0.12 [+0.03, +0.21]' when signed); 'n/a' for None."""
  if ci is None:
    return "n/a"
  f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
  return f"{f.format(ci['mean'])} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"
