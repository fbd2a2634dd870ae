"""Decoder building blocks: RMSNorm, rotary embedding, and linear layers with named LoRA.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) so
that a mesh plus logical-axis rules decide its sharding later (see
`clara_jax.partitioning`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple, TypeAlias, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.model.config import LoraConfig, RopeScaling

Array: TypeAlias = jax.Array

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
    scale = cast(
      Array,
      self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x.shape[-1],),
        self.param_dtype,
      ),
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before multiplying by the weight.
    return (x32.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


def rope_frequencies(
  head_dim: int, theta: float, scaling: Optional[RopeScaling] = None
) -> np.ndarray:
  """The rotary frequencies [head_dim / 2] (radians per position), float32; `scaling` a
  `config.RopeScaling` or None."""
  # float32 throughout, as the HF implementations compute them.
  inv_freq = 1.0 / (
    np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  )
  if scaling is not None:
    wavelength = 2 * np.pi / inv_freq
    context = scaling.original_max_position
    # 0 for wavelengths beyond context / low_freq_factor (fully scaled), 1 below
    # context / high_freq_factor (kept), linear in context / wavelength between.
    smooth = np.clip(
      (context / wavelength - scaling.low_freq_factor)
      / (scaling.high_freq_factor - scaling.low_freq_factor),
      0.0,
      1.0,
    )
    inv_freq = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return inv_freq.astype(np.float32)


def rope_tables(
  positions_bt: Array, head_dim: int, theta: float, scaling: Optional[RopeScaling] = None
) -> Tuple[Array, Array]:
  """(cos, sin) [batch, length, head_dim / 2] float32 tables of the rotary angles.

  The decoder builds them once per call, and every layer's queries and keys share them:
  fused into each rotation, sin/cos were evaluated per head and per element, which made
  RoPE ~9x slower on the CPU (a fifth of a document-encoding pass)."""
  inv_freq = jnp.asarray(rope_frequencies(head_dim, theta, scaling))
  angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  return materialized(jnp.cos(angles)), materialized(jnp.sin(angles))


def materialized(x: Array) -> Array:
  """`x`, computed once into its own buffer rather than fused into every consumer.

  XLA fuses elementwise producers into each of their consumers, recomputing them per
  consumer element (sin/cos per head and per layer, here); `lax.optimization_barrier` is
  removed before fusion on the CPU. A reduction is never fused into its consumers, so `x`
  goes through one, exactly (a sum with zeros; a few microseconds).
  """
  return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0)


def apply_rope(x_bthd: Array, rope: Tuple[Array, Array]) -> Array:
  """Rotary embedding in the "rotate half" layout of HF Mistral/Llama checkpoints.

  Args:
    x_bthd: [batch, length, heads, head_dim].
    rope: `rope_tables` of the positions, (cos, sin) [batch, length, head_dim / 2].
  """
  cos, sin = rope[0][:, :, None, :], rope[1][:, :, None, :]
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
    def a_init(key: Array, shape: Tuple[int, ...], dtype: Any) -> Array:
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    a = cast(
      Array,
      self.param(
        "a",
        nn.with_logical_partitioning(a_init, self.in_axes + ("lora_rank",)),
        self.in_shape + (self.rank,),
        self.param_dtype,
      ),
    )
    b = cast(
      Array,
      self.param(
        "b",
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank",) + self.out_axes),
        (self.rank,) + self.out_shape,
        self.param_dtype,
      ),
    )
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
  draws = jnp.concatenate(
    [(words >> (DROPOUT_BITS * i)) & byte_mask for i in range(per_word)], axis=-1
  )[..., :d]
  keep_prob = 1.0 - threshold / (1 << DROPOUT_BITS)
  return jnp.where(
    draws >= threshold, x * jnp.asarray(1.0 / keep_prob, x.dtype), jnp.zeros((), x.dtype)
  )


def _drop_threshold(rate: float) -> int:
  """Draws below this 8-bit value are dropped: `rate` in steps of 1/256, clipped."""
  return min(max(round(rate * (1 << DROPOUT_BITS)), 0), 1 << DROPOUT_BITS)


def effective_dropout_rate(rate: float) -> float:
  """The drop probability `dropout` applies for a requested `rate`."""
  return _drop_threshold(rate) / (1 << DROPOUT_BITS)


def matmul(x: Array, w: Array, n_in: int, dtype: Any, out_dtype: Any = None) -> Array:
  """x[..., in...] . w[in..., out...]: operands cast to `dtype`, float32 accumulation,
  result in `out_dtype` (default `dtype`). Below float32 it goes through `_mixed_dot`,
  whose backward matmuls keep the operands' dtype."""
  x, w = x.astype(dtype), w.astype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return _dot_f32(x, w, n_in).astype(out_dtype)
  return _mixed_dot(x, w, n_in, out_dtype)


def _dot_f32(x: Array, w: Array, n_in: int) -> Array:
  x_dims = tuple(range(x.ndim - n_in, x.ndim))
  return jax.lax.dot_general(
    x, w, ((x_dims, tuple(range(n_in))), ((), ())), preferred_element_type=jnp.float32
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_dot(x: Array, w: Array, n_in: int, out_dtype: Any) -> Array:
  """A bf16 (or other low-precision) matmul with float32 accumulation, rounded once to
  `out_dtype`.

  Differentiated plainly, the float32 accumulator makes the cotangent float32, so both
  backward matmuls would upcast their bf16 operands and run in float32: XLA's CPU backend
  does those 3x slower than bf16 x bf16 -> f32 (and bf16 -> bf16 is as slow), and a
  cached stage-2 step took ~20% longer. The custom backward rounds the cotangent to the
  operands' dtype (as mixed-precision training does) and keeps float32 accumulation.
  """
  return _dot_f32(x, w, n_in).astype(out_dtype)


def _mixed_dot_fwd(
  x: Array, w: Array, n_in: int, out_dtype: Any
) -> Tuple[Array, Tuple[Array, Array]]:
  return _mixed_dot(x, w, n_in, out_dtype), (x, w)


def _mixed_dot_bwd(
  n_in: int, out_dtype: Any, residuals: Tuple[Array, Array], g: Array
) -> Tuple[Array, Array]:
  x, w = residuals
  g = g.astype(x.dtype)
  lead, n_out = x.ndim - n_in, w.ndim - n_in
  # dx[..., in] = g[..., out] . w[in, out]; dw[in, out] = x[..., in] . g[..., out].
  dx = jax.lax.dot_general(
    g,
    w,
    ((tuple(range(lead, lead + n_out)), tuple(range(n_in, w.ndim))), ((), ())),
    preferred_element_type=jnp.float32,
  )
  dw = jax.lax.dot_general(
    x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())), preferred_element_type=jnp.float32
  )
  return dx.astype(x.dtype), dw.astype(w.dtype)


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


class LoraLinear(nn.Module):
  """A linear layer over the last `n_in` axes (a bias when `use_bias`) with any number of
  named adapters.

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
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = tuple(x.shape[-self.n_in :])
    in_axes = self.kernel_axes[: self.n_in]
    out_axes = self.kernel_axes[self.n_in :]
    kernel = cast(
      Array,
      self.param(
        "kernel",
        nn.with_logical_partitioning(default_kernel_init, self.kernel_axes),
        in_shape + tuple(self.features),
        self.param_dtype,
      ),
    )
    y = matmul(x, kernel, self.n_in, self.dtype)
    if self.use_bias:
      bias = cast(
        Array,
        self.param(
          "bias",
          nn.with_logical_partitioning(nn.initializers.zeros, out_axes),
          tuple(self.features),
          self.param_dtype,
        ),
      )
      y = y + bias.astype(y.dtype)
    if self.lora is None:
      if self.active_adapter is not None:
        raise ValueError(f"adapter {self.active_adapter!r} requested but the model has no LoRA")
      return y
    if self.active_adapter is not None and self.active_adapter not in self.lora.adapters:
      raise ValueError(
        f"unknown adapter {self.active_adapter!r}; the model has {self.lora.adapters}"
      )
    factors = {}
    for name in self.lora.adapters:  # all adapters exist so any subset can be trained
      factors[name] = LoraFactors(
        in_shape,
        tuple(self.features),
        in_axes,
        out_axes,
        self.lora.rank,
        self.param_dtype,
        name=lora_prefix(name),
      )()
    if self.active_adapter is None:
      return y
    a, b = factors[self.active_adapter]
    x_in = x
    if not self.deterministic and self.lora.dropout > 0:
      x_in = dropout(x, self.lora.dropout, self.make_rng("dropout"))
    low_rank = matmul(x_in, a, self.n_in, self.dtype)
    return y + matmul(low_rank, b, 1, self.dtype) * jnp.asarray(self.lora.scale, self.dtype)


def attention_bias(mask_bts: Array) -> Array:
  """Additive float32 bias from a boolean mask (True: attend).

  A large finite negative (not -inf) keeps fully-masked rows (padding queries) NaN-free.
  """
  return jnp.where(mask_bts, 0.0, jnp.finfo(jnp.float32).min / 2).astype(jnp.float32)


def constrain(x: Array, axes: Sequence[Optional[str]]) -> Array:
  """Logical sharding constraint on an activation (a no-op without rules/mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))
