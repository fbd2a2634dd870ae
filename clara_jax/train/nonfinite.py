"""Counting skipped (non-finite) updates without a device-to-host read per step.

The train step skips an update whose loss or gradients are not finite and reports
`nonfinite = 1`. Reading that flag on the host after every step would make the host wait
for the step to finish before it dispatches the next one, which stalls an accelerator's
queue. `NonFiniteStreak` keeps the count of consecutive skipped updates on the device
(one tiny jitted update per step, dispatched asynchronously like the step itself); the
loop reads it only where it reads metrics anyway: at logging, checkpoint and final
steps. A run therefore stops at the first such step at or after the streak reaches the
limit; the updates in between were skipped, so the parameters are still the last good
ones.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite updates: the run stops, checkpoints intact."""


@jax.jit
def _advance(
  carry: Tuple[jax.Array, jax.Array], nonfinite: jax.Array, step: Any, limit: Any
) -> Tuple[jax.Array, jax.Array]:
  """carry = (streak, first step at which the streak reached `limit`, or 0)."""
  streak, reached_at = carry
  streak = jnp.where(nonfinite > 0, streak + 1, 0)
  reached_at = jnp.where((reached_at == 0) & (streak >= limit), step, reached_at)
  return streak, reached_at


class NonFiniteStreak:
  """`update(nonfinite, step)` after every step (device only); `check(step)` at the
  steps where the host reads (raises `NonFiniteError` once the streak reached `limit`)."""

  def __init__(self, limit: int):
    self.limit = limit
    self._carry = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update(self, nonfinite: jax.Array, step: int) -> None:
    self._carry = _advance(self._carry, nonfinite, jnp.int32(step), jnp.int32(self.limit))

  def check(self, step: int, where: str) -> None:
    """`where`: what the error tells the user is intact (e.g. the checkpoint directory)."""
    reached_at = int(jax.device_get(self._carry[1]))
    if reached_at:
      raise NonFiniteError(
        f"{self.limit} consecutive steps had a non-finite loss or gradient (the streak "
        f"reached {self.limit} at step {reached_at}, seen at step {step}); the updates "
        f"were skipped, and the last good checkpoint in {where} is intact"
      )
