"""One stage of a pipeline trained in `WORKDIR/STAGE`: resumed from its checkpoint when
one exists, skipped once finished (`DONE.json` beside its export)."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, Optional, TextIO

from clara_jax import paths
from clara_jax.pipeline.recipe import Recipe, stage_config

DONE_FILE = "DONE.json"


class StageStopped(RuntimeError):
  """A stage's training stopped early (preempted): its checkpoint is kept, no export.
  `exit_code`: what the command exits with (128 + the signal that stopped it)."""

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


def duration(seconds: float) -> str:
  if seconds != seconds:  # nan
    return "?"
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class ProgressBar:
  """One line per logging step: bar, step, loss, speed and ETA of the running stage."""

  def __init__(self, stage: str, out: TextIO = sys.stdout, width: int = 24):
    self.stage, self.out, self.width = stage, out, width

  def __call__(self, step: int, total: int, metrics: Dict[str, float]) -> None:
    filled = int(self.width * step / max(total, 1))
    speed = metrics.get("steps_per_s", 0.0)
    eta = (total - step) / speed if speed > 0 else float("nan")
    self.out.write(
      f"[{self.stage:>8}] {'#' * filled}{'.' * (self.width - filled)} "
      f"{step}/{total} loss {metrics.get('loss', float('nan')):.3f} "
      f"{speed:.1f} steps/s ETA {duration(eta)}\n"
    )
    self.out.flush()


def finished_metrics(stage_dir: str) -> Optional[Dict[str, Any]]:
  """The recorded metrics of a finished stage, or None."""
  done = paths.join(stage_dir, DONE_FILE)
  return paths.read_json(done)["metrics"] if paths.exists(done) else None


def mark_finished(stage_dir: str, metrics: Dict[str, Any], seconds: float) -> None:
  paths.write_json(
    paths.join(stage_dir, DONE_FILE), {"metrics": metrics, "seconds": seconds}, indent=None
  )


def run_stage(
  stage: str,
  workdir: str,
  recipe: Recipe,
  seed: int = 0,
  log: Callable[[str], None] = print,
  extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
  """Trains one stage unless it finished before; returns its last metrics."""
  from clara_jax.train.loop import Preempted, train

  stage_dir = paths.join(workdir, stage)
  done = finished_metrics(stage_dir)
  if done is not None:
    log(f"[{stage:>8}] finished before: skipped")
    return done
  start = time.perf_counter()
  try:
    metrics = train(
      stage_config(stage, recipe, seed, extra), stage_dir, progress=ProgressBar(stage)
    )
  except Preempted as e:
    raise StageStopped(f"[{stage:>8}] {e}", e.exit_code) from e
  seconds = time.perf_counter() - start
  if not paths.exists(paths.join(stage_dir, "export", "config.json")):
    # train() returns early, checkpoint saved, on SIGTERM: not finished, so not skipped.
    raise StageStopped(
      f"[{stage:>8}] stopped before its last step (SIGTERM?); run the "
      f"same command again to resume from {stage_dir}/checkpoints"
    )
  mark_finished(stage_dir, metrics, seconds)
  log(f"[{stage:>8}] done in {duration(seconds)}")
  return metrics
