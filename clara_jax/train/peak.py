"""Timing, and the measured matmul peak that MFU divides by (used by `train` for its
logged MFU and by the benchmarks).

MFU is a step's FLOPs (`clara_jax.model.flops`) per second over the peak of a jitted
2048^3 matmul in the step's compute dtype, measured once in the same process.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 1, iters: int = 5) -> float:
  """Median wall seconds of `fn(*args)` (blocked until ready), after warm-up calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(n: int = 2048, dtype: Any = jnp.float32, iters: int = 5) -> float:
  """FLOP/s of a jitted n^3 matmul in `dtype` (float32 accumulation) on the default
  device; measured once per process and dtype, so every figure of a run divides by the
  same peak."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (n, n), dtype)
  b = jax.random.normal(keys[1], (n, n), dtype)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  return 2.0 * n**3 / time_fn(matmul, a, b, iters=iters)
