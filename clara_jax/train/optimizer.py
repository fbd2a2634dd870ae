"""AdamW with the paper's settings, its learning-rate schedules, and per-parameter
learning-rate multipliers chosen by regex over parameter paths."""

from __future__ import annotations

import re
from typing import Any, Sequence, Tuple

import jax
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(
  lr: float,
  total_steps: int,
  schedule: str = "cosine",
  warmup_ratio: float = 0.03,
  final_ratio: float = 0.1,
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


def make_optimizer(
  schedule: optax.Schedule,
  b1: float = 0.9,
  b2: float = 0.95,
  weight_decay: float = 0.0,
  clip_norm: float = 1.0,
  eps: float = 1e-8,
  lr_multipliers: Sequence[Tuple[str, float]] = (),
) -> optax.GradientTransformation:
  """Global-norm clipping, AdamW, then `scale_by_path(lr_multipliers)` when given.
  Applied to the trainable parameters only (the train state keeps frozen parameters
  apart), so no state is spent on frozen ones."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  if lr_multipliers:
    parts.append(scale_by_path(lr_multipliers))
  return optax.chain(*parts)


def path_string(path: Sequence[Any]) -> str:
  """A tree path of dict keys as 'a/b/c' (the train state's flat keys are whole paths)."""
  return "/".join(str(getattr(entry, "key", entry)) for entry in path)


def check_lr_multipliers(lr_multipliers: Sequence[Tuple[str, float]], paths: Sequence[str]) -> None:
  """Clear errors for a multiplier list that cannot mean what it says: a pattern that is
  not a regex, a multiplier that is not a positive number, or a pattern that matches
  none of the trainable parameters (a typo would otherwise change nothing, silently)."""
  for i, entry in enumerate(lr_multipliers):
    if len(entry) != 2:
      raise ValueError(
        f"config: optimizer.lr_multipliers[{i}] = {entry!r} is not a (regex, multiplier) pair"
      )
    pattern, factor = entry
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(
        f"config: optimizer.lr_multipliers[{i}] pattern {pattern!r} is not a regex: {e}"
      ) from e
    if not isinstance(factor, (int, float)) or not factor > 0:
      raise ValueError(
        f"config: optimizer.lr_multipliers[{i}] multiplier {factor!r} must be a positive number"
      )
    if not any(compiled.fullmatch(p) for p in paths):
      raise ValueError(
        f"config: optimizer.lr_multipliers[{i}] pattern {pattern!r} matches "
        f"no trainable parameter (e.g. {sorted(paths)[:2]})"
      )


def freeze_by_path(mask: Any, frozen: Sequence[str]) -> Any:
  """The trainable `mask` (a boolean tree keyed by parameter path) with every parameter
  whose path fully matches a regex of `frozen` set to False (big_vision's regex
  freezing). A bad regex, or one that matches no trainable parameter, is an error."""
  from clara_jax.model import lora

  flat = lora.flatten(mask)
  trainable = [path for path, on in flat.items() if on]
  compiled = []
  for i, pattern in enumerate(frozen):
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise ValueError(f"config: optimizer.frozen[{i}] = {pattern!r} is not a regex: {e}") from e
    if not any(compiled[-1].fullmatch(p) for p in trainable):
      raise ValueError(
        f"config: optimizer.frozen[{i}] pattern {pattern!r} matches no "
        f"trainable parameter (e.g. {sorted(trainable)[:2]})"
      )
  return lora.unflatten(
    {path: bool(on) and not any(c.fullmatch(path) for c in compiled) for path, on in flat.items()}
  )


def scale_by_path(lr_multipliers: Sequence[Tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update by the factor of the first (regex, factor) pair whose regex
  fully matches the parameter's path ('layers_0/attn/q_proj/lora_reasoner/a'), 1 where
  none does: a learning rate per parameter group, e.g. one adapter faster than another
  that trains beside it."""
  compiled = [(re.compile(p), float(f)) for p, f in lr_multipliers]

  def factor(path: Sequence[Any]) -> float:
    name = path_string(path)
    return next((f for c, f in compiled if c.fullmatch(name)), 1.0)

  def init_fn(params: Any) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates: Any, state: Any, params: Any = None) -> Tuple[Any, Any]:
    del params

    def scale(path: Sequence[Any], u: Any) -> Any:
      f = factor(path)
      return u if f == 1.0 else u * f

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)
