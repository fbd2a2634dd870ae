"""Intervals for the evaluation's claims: percentile bootstrap over questions.

Every difference the project calls a win is a paired difference on the same questions
(stage2 minus a baseline, real lens minus its permutation null), so the bootstrap
resamples questions and keeps each question's pair together. Seeded: the same inputs
give the same interval on every machine.
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional, Sequence, Tuple

import numpy as np

NUM_RESAMPLES = 2000
# One row of a claims table: (claim, measured, target, passed); passed None for a row
# reported without a target.
ClaimRow = Tuple[str, str, str, Optional[bool]]


def bootstrap_ci(
  values: Sequence[Optional[float]],
  seed: int = 0,
  num_resamples: int = NUM_RESAMPLES,
  level: float = 0.95,
  clusters: Optional[Sequence[Hashable]] = None,
) -> Optional[Dict[str, float]]:
  """{"mean", "lo", "hi", "n"}: the mean of `values` [questions] (None: unknown, left out) and the percentile bootstrap
  interval of that mean at `level`; None for no values. One value gives lo = hi = it.

  `clusters` [questions]: questions that share a cause (e.g. one edited fact) are resampled
  together, whole clusters at a time, so they do not count as independent."""
  keep = [i for i, v in enumerate(values) if v is not None]
  x = np.asarray([values[i] for i in keep], np.float64)
  if x.size == 0:
    return None
  rng = np.random.default_rng(seed)
  if clusters is None:
    means = x[rng.integers(0, x.size, (num_resamples, x.size))].mean(axis=1)
  else:
    if len(clusters) != len(values):
      raise ValueError(f"clusters needs one label per value, got {len(clusters)} for {len(values)}")
    labels = {c: j for j, c in enumerate(dict.fromkeys(clusters[i] for i in keep))}
    of = np.asarray([labels[clusters[i]] for i in keep])
    sums = np.bincount(of, weights=x, minlength=len(labels))
    sizes = np.bincount(of, minlength=len(labels)).astype(np.float64)
    picks = rng.integers(0, len(labels), (num_resamples, len(labels)))
    means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
  tail = (1.0 - level) / 2.0
  lo, hi = np.quantile(means, [tail, 1.0 - tail])
  return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(x.size)}


def paired_difference(
  a: Sequence[Optional[float]],
  b: Sequence[Optional[float]],
  seed: int = 0,
  num_resamples: int = NUM_RESAMPLES,
  clusters: Optional[Sequence[Hashable]] = None,
) -> Optional[Dict[str, float]]:
  """Bootstrap interval of mean(a - b) over the questions where both are known; a and b
  [questions] are aligned per question (None marks a missing value); `clusters` as in
  `bootstrap_ci`."""
  if len(a) != len(b):
    raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
  diffs = [None if x is None or y is None else x - y for x, y in zip(a, b)]
  return bootstrap_ci(diffs, seed, num_resamples, clusters=clusters)


def format_ci(ci: Optional[Dict[str, float]], digits: int = 2, signed: bool = False) -> str:
  """'0.42 [0.35, 0.49]' (or '+0.12 [+0.03, +0.21]' when signed); 'n/a' for None."""
  if ci is None:
    return "n/a"
  f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
  return f"{f.format(ci['mean'])} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"


def format_difference(ci: Optional[Dict[str, float]]) -> str:
  """`format_ci` of a paired difference: signed."""
  return format_ci(ci, signed=True)


def format_value(x: Optional[float]) -> str:
  """'0.42'; 'n/a' for None."""
  return "n/a" if x is None else f"{x:.2f}"


def above_zero(ci: Optional[Dict[str, float]]) -> Optional[bool]:
  """Whether a difference's interval lies above zero; None without an interval."""
  return None if ci is None else ci["lo"] > 0


def reported(claim: str, measured: str) -> ClaimRow:
  """A claims-table row shown without a target."""
  return (claim, measured, "(reported)", None)


def mean_at_least(ci: Optional[Dict[str, float]], target: float) -> Optional[bool]:
  """Whether an interval's mean reaches `target`; None without an interval."""
  return None if ci is None else ci["mean"] >= target
