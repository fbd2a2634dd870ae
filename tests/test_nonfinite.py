"""The non-finite streak is counted on the device and read only when asked."""

import jax
import jax.numpy as jnp
import pytest

from clara_jax.train.nonfinite import NonFiniteError, NonFiniteStreak


def test_streak_counts_on_device_and_stops_at_the_limit():
  streak = NonFiniteStreak(limit=3)
  flags = [0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0]
  for step, flag in enumerate(flags[:6], start=1):
    streak.update(jnp.int32(flag), step)
  streak.check(6, "ckpt")  # longest run so far: 2
  for step, flag in enumerate(flags[6:], start=7):
    streak.update(jnp.int32(flag), step)
  with pytest.raises(NonFiniteError, match=r"reached 3 at step 10, seen at step 11"):
    streak.check(11, "ckpt")


def test_only_check_reads_the_device(monkeypatch):
  from clara_jax.train import nonfinite

  reads = []
  real_get = jax.device_get
  monkeypatch.setattr(nonfinite.jax, "device_get", lambda x: reads.append(1) or real_get(x))
  streak = NonFiniteStreak(limit=2)
  for step in range(1, 4):
    streak.update(jnp.int32(1), step)
  assert reads == [] and all(isinstance(x, jax.Array) for x in streak._carry)
  with pytest.raises(NonFiniteError, match="at step 2, seen at step 3"):
    streak.check(3, "ckpt")
  assert reads == [1]
