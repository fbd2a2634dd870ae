"""Straight-through top-k selection (CLaRa's Algorithm 1) as a `jax.custom_vjp`.

Forward: exact one-hot rows of the k highest scores, ordered as `jax.lax.top_k` orders
them (descending score; ties go to the lower index). Backward: the VJP of the sequential
masked softmax

    s' = s / max(tau, 1e-6)
    P_j = softmax(s' + log(1 - taken_j + 1e-8)),  taken_j = sum_{i<j} hard_i,

i.e. exactly what `hard + P - stop_gradient(P)` differentiates to. Because `taken_j` depends
only on the (constant) hard selection, all k slots are computed at once, with no loop.

Masked candidates: a score of -inf means "never prefer this candidate". Such candidates
are chosen only after every finite one (then in index order), get probability 0 in every
soft slot and receive zero gradient. A row whose scores are all -inf gets zero weights'
gradient (the plain formula would give NaN there). NaN scores are an error when
`check_nans=True`, reported through `jax.experimental.checkify` (wrap the caller with
`checked`), rather than a silent selection.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Tuple, TypeAlias, TypeVar, cast

import jax
import jax.numpy as jnp
from jax.experimental import checkify

Array: TypeAlias = jax.Array
# A temperature: a Python float or a traced scalar.
Temperature: TypeAlias = Any
Fn = TypeVar("Fn", bound=Callable[..., Any])


def _hard_topk(scores_bn: Array, k: int) -> Tuple[Array, Array]:
  _, indices_bk = jax.lax.top_k(scores_bn, k)
  hard_bkn = jax.nn.one_hot(indices_bk, scores_bn.shape[-1], dtype=jnp.float32)
  return hard_bkn, indices_bk.astype(jnp.int32)


def soft_topk(scores_bn: Array, hard_bkn: Array, temperature: Temperature) -> Array:
  """The soft path P [batch, k, N] for a given hard selection (differentiable in scores)."""
  s = scores_bn.astype(jnp.float32) / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  taken_bkn = jnp.cumsum(hard_bkn, axis=1) - hard_bkn  # slots chosen before slot j
  # taken is exactly 0 or 1, so log(1 - taken + 1e-8) is log(1e-8) or (in float32) 0;
  # writing it as a select keeps XLA from reassociating 1 - 1 + 1e-8 into log(0).
  logits = s[:, None, :] + jnp.where(taken_bkn > 0.5, jnp.log(1e-8), 0.0).astype(jnp.float32)
  finite = jnp.isfinite(logits)
  any_finite = jnp.any(finite, axis=-1, keepdims=True)
  # All -inf rows would be NaN under softmax; they get zeros (and zero gradient).
  safe = jnp.where(any_finite, logits, 0.0)
  probs = jax.nn.softmax(jnp.where(finite | ~any_finite, safe, -jnp.inf), axis=-1)
  return jnp.where(any_finite, probs, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _st_topk(scores_bn: Array, k: int, temperature: Temperature) -> Tuple[Array, Array]:
  return _hard_topk(scores_bn, k)


def _st_topk_fwd(
  scores_bn: Array, k: int, temperature: Temperature
) -> Tuple[Tuple[Array, Array], Tuple[Array, Array, Temperature]]:
  hard_bkn, indices_bk = _hard_topk(scores_bn, k)
  return (hard_bkn, indices_bk), (scores_bn, hard_bkn, temperature)


def _st_topk_bwd(
  k: int, residuals: Tuple[Array, Array, Temperature], cotangents: Tuple[Array, Any]
) -> Tuple[Array, Array]:
  scores_bn, hard_bkn, temperature = residuals
  g_weights_bkn, _ = cotangents  # indices are integers: no cotangent flows through them
  _, vjp = jax.vjp(lambda s: soft_topk(s, hard_bkn, temperature), scores_bn)
  (g_scores,) = vjp(g_weights_bkn.astype(jnp.float32))
  # The temperature only shapes the surrogate gradient; it is not trained.
  return g_scores.astype(scores_bn.dtype), jnp.zeros_like(jnp.asarray(temperature))


_st_topk.defvjp(_st_topk_fwd, _st_topk_bwd)


def straight_through_topk(
  scores_bn: Array, k: int, temperature: Temperature = 0.02, *, check_nans: bool = False
) -> Tuple[Array, Array]:
  """Selects the top-k candidates with straight-through gradients.

  Args:
    scores_bn: [batch, N] scores (any float dtype; the soft path runs in float32).
    k: number of selections, 1 <= k <= N (static).
    temperature: tau of the soft path; changes gradients, never the selection.
    check_nans: add a checkify check that no score is NaN (debug mode).

  Returns:
    weights_bkn: float32 [batch, k, N], one-hot rows in the forward pass.
    indices_bk: int32 [batch, k], the chosen candidates, best first.
  """
  if scores_bn.ndim != 2:
    raise ValueError(f"scores must be [batch, N], got shape {scores_bn.shape}")
  n = scores_bn.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be between 1 and the number of candidates {n}")
  if check_nans:
    checkify.check(
      ~jnp.any(jnp.isnan(scores_bn)),
      "straight_through_topk: NaN in retrieval scores (check the compressor/reasoner outputs)",
    )
  return _st_topk(scores_bn, k, temperature)


def checked(fn: Fn) -> Fn:
  """Wraps `fn` so that checkify checks inside it (e.g. `check_nans`) raise errors."""
  checked_fn = checkify.checkify(fn, errors=checkify.user_checks)

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    err, out = checked_fn(*args, **kwargs)
    err.throw()
    return out

  return cast(Fn, wrapper)
