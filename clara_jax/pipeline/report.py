"""A pipeline's report: the claims table (printed and in `summary.json`), the stages'
loss curves (`losses.png`), what produced it (`provenance`), and the table of several
seeds pooled."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from clara_jax import paths
from clara_jax.pipeline.evaluation import ClaimRow
from clara_jax.pipeline.recipe import Recipe

SUMMARY_FILE = "summary.json"
SEEDS_SUMMARY_FILE = "seeds_summary.json"


def claims_met(summary: Dict[str, Any]) -> bool:
  """True when the table has rows and none with a target missed it."""
  return bool(summary["claims"]) and all(
    row.get("passed") is not False for row in summary["claims"]
  )


def _mark(passed: Optional[bool], missing: str = "") -> str:
  return missing if passed is None else ("PASS" if passed else "miss")


def format_table(rows: Sequence[ClaimRow]) -> str:
  width = max(len(r[0]) for r in rows)
  measured_w = max(14, max(len(r[1]) for r in rows))
  lines = [f"{'claim':<{width}}  {'measured':<{measured_w}} {'target':<16} result"]
  for claim, measured, target, passed in rows:
    lines.append(f"{claim:<{width}}  {measured:<{measured_w}} {target:<16} {_mark(passed)}")
  return "\n".join(lines)


def format_seeds_table(
  pooled: Sequence[ClaimRow], verdicts: Dict[int, Dict[str, Optional[bool]]]
) -> str:
  """The pooled table with one verdict column per seed (PASS / miss / - for no target)."""
  seeds = sorted(verdicts)
  rows = [
    (
      claim,
      measured,
      target,
      passed,
      " ".join(f"{_mark(verdicts[s].get(claim), '-'):<4}" for s in seeds),
    )
    for claim, measured, target, passed in pooled
  ]
  width = max(len(r[0]) for r in rows)
  measured_w = max(len(r[1]) for r in rows)
  target_w = max(16, max(len(r[2]) for r in rows))
  head = " ".join(f"s{s:<3}" for s in seeds)
  lines = [
    f"{'claim (all seeds pooled)':<{width}}  {'measured':<{measured_w}} "
    f"{'target':<{target_w}} {'pooled':<6} {head}"
  ]
  for claim, measured, target, passed, per_seed in rows:
    lines.append(
      f"{claim:<{width}}  {measured:<{measured_w}} {target:<{target_w}} "
      f"{_mark(passed, '-'):<6} {per_seed}"
    )
  return "\n".join(lines)


def plot_losses(workdir: str, stages: Sequence[str], path: str) -> None:
  """One loss curve per stage, side by side."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from clara_jax.eval.lens import save_figure
  from clara_jax.train.metrics import read_metrics

  fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    rows = read_metrics(paths.join(workdir, stage))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_title(stage)
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("loss")
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def provenance() -> Dict[str, Any]:
  """What produced a report: the time, the command line, and the git commit of the
  clara_jax checkout (with whether it had uncommitted changes), where there is one."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out: Dict[str, Any] = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": list(sys.argv)}
  try:
    git = lambda *a: subprocess.run(
      ["git", "-C", root, *a], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    out["commit"] = git("rev-parse", "HEAD")
    out["uncommitted_changes"] = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    out["commit"] = None  # an installed package, not a checkout
  return out


def claim_dicts(rows: Sequence[ClaimRow]) -> List[Dict[str, Any]]:
  return [dict(zip(("claim", "measured", "target", "passed"), row)) for row in rows]


def write_report(
  workdir: str,
  recipe: Recipe,
  stage_metrics: Dict[str, Dict],
  results: Dict[str, Any],
  table: Sequence[ClaimRow],
  seconds: float,
  log: Callable[[str], None] = print,
  extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
  """`losses.png` of the trained stages and `summary.json` (recipe, stage metrics,
  results, claims, seconds, provenance, plus `extra`); logs the table; returns the
  summary."""
  plot_losses(workdir, recipe.train, paths.join(workdir, "losses.png"))
  summary = {
    "recipe": dataclasses.asdict(recipe),
    "stages": stage_metrics,
    "results": results,
    "claims": claim_dicts(table),
    "seconds": seconds,
    "provenance": provenance(),
    **(extra or {}),
  }
  paths.write_json(paths.join(workdir, SUMMARY_FILE), summary, default=str)
  log("\n" + format_table(table))
  log(f"\nartefacts in {workdir}: {SUMMARY_FILE}, lens.png, losses.png, */tensorboard")
  return summary
