"""FLOP counts of the decoder and the measured matmul peak of this machine.

MFU here is model FLOPs per second over the peak of a jitted float32 2048^3 matmul
measured in the same process, so CPU figures are comparable across runs and machines.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from clara_jax.model.config import DecoderConfig


def time_fn(fn, *args, warmup: int = 1, iters: int = 5) -> float:
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


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, iters: int = 5) -> float:
  """FLOP/s of a jitted n^3 matmul on the default device."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (n, n), dtype)
  b = jax.random.normal(keys[1], (n, n), dtype)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  return 2.0 * n**3 / time_fn(matmul, a, b, iters=iters)


def linear_params(cfg: DecoderConfig) -> int:
  """Weights of the per-token linear layers in all blocks (no embeddings, no LoRA)."""
  d, f, h, kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                     cfg.num_kv_heads, cfg.head_dim)
  return cfg.num_layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f)


def forward_flops(cfg: DecoderConfig, batch: int, length: int, lora_rank: int = 0,
                  head_tokens: int | None = None) -> float:
  """Forward FLOPs for `batch` sequences of `length`, attention over the full square as
  computed; `head_tokens` tokens go through the LM head (default: all)."""
  tokens = batch * length
  flops = 2.0 * linear_params(cfg) * tokens
  if lora_rank:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    io = [(d, cfg.num_heads * hd), (d, cfg.num_kv_heads * hd), (d, cfg.num_kv_heads * hd),
          (cfg.num_heads * hd, d), (d, f), (d, f), (f, d)]
    flops += 2.0 * cfg.num_layers * tokens * sum(lora_rank * (i + o) for i, o in io)
  flops += 4.0 * cfg.num_layers * batch * length**2 * cfg.num_heads * cfg.head_dim
  flops += 2.0 * cfg.hidden_size * cfg.vocab_size * (tokens if head_tokens is None else head_tokens)
  return flops
