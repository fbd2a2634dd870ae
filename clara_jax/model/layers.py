"""Decoder building blocks: RMSNorm, rotary embedding, and linear layers with named LoRA.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) so
that a mesh plus logical-axis rules decide its sharding later (see
`clara_jax.partitioning`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clara_jax.model.config import LoraConfig

Array = jax.Array

# HF Mistral/Llama initialise every weight as N(0, 0.02); from-scratch runs do the same.
default_kernel_init = nn.initializers.normal(stddev=0.02)


def lora_prefix(adapter: str) -> str:
  """Name of an adapter's subtree inside each linear layer."""
  return f"lora_{adapter}"


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 (as HF Mistral) and cast back."""

  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before multiplying by the weight.
    return (x32.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


def apply_rope(x_bthd: Array, positions_bt: Array, theta: float) -> Array:
  """Rotary embedding in the "rotate half" layout of HF Mistral/Llama checkpoints.

  Args:
    x_bthd: [batch, length, heads, head_dim].
    positions_bt: [batch, length] integer positions.
    theta: the RoPE base.
  """
  head_dim = x_bthd.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_btf)[:, :, None, :]
  sin = jnp.sin(angles_btf)[:, :, None, :]
  x32 = x_bthd.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_bthd.dtype)


class LoraFactors(nn.Module):
  """The A [in..., r] and B [r, out...] factors of one adapter of one linear layer."""

  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  in_axes: Tuple[str, ...]
  out_axes: Tuple[str, ...]
  rank: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> Tuple[Array, Array]:
    fan_in = 1
    for n in self.in_shape:
      fan_in *= n
    bound = 1.0 / fan_in**0.5

    # PEFT's default: A uniform(+-1/sqrt(fan_in)), B zero, so a new adapter is a no-op.
    def a_init(key, shape, dtype):
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    a = self.param("a", nn.with_logical_partitioning(a_init, self.in_axes + ("lora_rank",)),
                   self.in_shape + (self.rank,), self.param_dtype)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                     ("lora_rank",) + self.out_axes),
                   (self.rank,) + self.out_shape, self.param_dtype)
    return a, b


DROPOUT_BITS = 8


def dropout(x: Array, rate: float, rng: Array) -> Array:
  """Inverted dropout whose Bernoulli draws take 8 random bits each, four per 32-bit word.

  JAX's partitionable threefry spends one full hash per element whatever the requested
  width; a LoRA step drops ~7M inputs, and those hashes were a third of a cached stage-2
  step on the CPU. The drop probability is `rate` rounded to a multiple of 1/256 (0.1 ->
  26/256 = 0.1016, see `effective_dropout_rate`); kept inputs are scaled by the exact
  inverse keep probability, so the expectation is unchanged.
  """
  threshold = _drop_threshold(rate)
  if threshold <= 0:
    return x
  if threshold >= 1 << DROPOUT_BITS:
    return jnp.zeros_like(x)
  per_word = 32 // DROPOUT_BITS
  d = x.shape[-1]
  words = jax.random.bits(rng, x.shape[:-1] + (-(-d // per_word),), jnp.uint32)
  byte_mask = jnp.uint32((1 << DROPOUT_BITS) - 1)
  draws = jnp.concatenate([(words >> (DROPOUT_BITS * i)) & byte_mask
                           for i in range(per_word)], axis=-1)[..., :d]
  keep_prob = 1.0 - threshold / (1 << DROPOUT_BITS)
  return jnp.where(draws >= threshold, x * jnp.asarray(1.0 / keep_prob, x.dtype),
                   jnp.zeros((), x.dtype))


def _drop_threshold(rate: float) -> int:
  """Draws below this 8-bit value are dropped: `rate` in steps of 1/256, clipped."""
  return min(max(round(rate * (1 << DROPOUT_BITS)), 0), 1 << DROPOUT_BITS)


def effective_dropout_rate(rate: float) -> float:
  """The drop probability `dropout` applies for a requested `rate`."""
  return _drop_threshold(rate) / (1 << DROPOUT_BITS)


def _contract(x: Array, w: Array, n_in: int, dtype) -> Array:
  """x[..., in...] . w[in..., out...] with float32 accumulation, cast to `dtype`."""
  x_dims = tuple(range(x.ndim - n_in, x.ndim))
  w_dims = tuple(range(n_in))
  y = jax.lax.dot_general(x.astype(dtype), w.astype(dtype), ((x_dims, w_dims), ((), ())),
                          preferred_element_type=jnp.float32)
  return y.astype(dtype)


class LoraLinear(nn.Module):
  """A bias-free linear layer over the last `n_in` axes with any number of named adapters.

  Every adapter in `lora.adapters` owns a `lora_<name>` subtree; only `active_adapter`
  (None: none) is applied. The active adapter is a static module attribute chosen by the
  caller of the pure apply function, never hidden state.
  """

  features: Tuple[int, ...]
  kernel_axes: Tuple[str, ...]
  n_in: int = 1
  lora: Optional[LoraConfig] = None
  active_adapter: Optional[str] = None
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = tuple(x.shape[-self.n_in:])
    in_axes = self.kernel_axes[:self.n_in]
    out_axes = self.kernel_axes[self.n_in:]
    kernel = self.param("kernel",
                        nn.with_logical_partitioning(default_kernel_init, self.kernel_axes),
                        in_shape + tuple(self.features), self.param_dtype)
    y = _contract(x, kernel, self.n_in, self.dtype)
    if self.lora is None:
      if self.active_adapter is not None:
        raise ValueError(f"adapter {self.active_adapter!r} requested but the model has no LoRA")
      return y
    if self.active_adapter is not None and self.active_adapter not in self.lora.adapters:
      raise ValueError(
          f"unknown adapter {self.active_adapter!r}; the model has {self.lora.adapters}")
    factors = {}
    for name in self.lora.adapters:  # all adapters exist so any subset can be trained
      factors[name] = LoraFactors(in_shape, tuple(self.features), in_axes, out_axes,
                                  self.lora.rank, self.param_dtype, name=lora_prefix(name))()
    if self.active_adapter is None:
      return y
    a, b = factors[self.active_adapter]
    x_in = x
    if not self.deterministic and self.lora.dropout > 0:
      x_in = dropout(x, self.lora.dropout, self.make_rng("dropout"))
    low_rank = _contract(x_in, a, self.n_in, self.dtype)
    return y + _contract(low_rank, b, 1, self.dtype) * jnp.asarray(self.lora.scale, self.dtype)


def attention_bias(mask_bqk: Array) -> Array:
  """Additive float32 bias from a boolean mask (True: attend).

  A large finite negative (not -inf) keeps fully-masked rows (padding queries) NaN-free.
  """
  return jnp.where(mask_bqk, 0.0, jnp.finfo(jnp.float32).min / 2).astype(jnp.float32)


def constrain(x: Array, axes: Sequence[Optional[str]]) -> Array:
  """Logical sharding constraint on an activation (a no-op without rules/mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))
