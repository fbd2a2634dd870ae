"""AdamW with the paper's settings and its learning-rate schedules."""

from __future__ import annotations

import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(lr: float, total_steps: int, schedule: str = "cosine",
                           warmup_ratio: float = 0.03, final_ratio: float = 0.1
                           ) -> optax.Schedule:
  """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to
  `final_ratio * lr` (stages 1 and 1_2 of the paper) or constant (stage 2)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; known: {SCHEDULES}")
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  warmup = int(round(warmup_ratio * total_steps))
  if schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=final_ratio)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95,
                   weight_decay: float = 0.0, clip_norm: float = 1.0,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW. Applied to the trainable parameters only (the
  train state keeps frozen parameters apart), so no state is spent on frozen ones."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)
