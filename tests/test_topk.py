"""straight_through_topk: values, gradients against the plain formulation, transforms,
edge cases (k = 1, k = N, ties, -inf, NaN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clara_jax import partitioning
from clara_jax.ops import checked, straight_through_topk


def plain_topk(scores, k, tau):
  """The reference formulation, slot by slot: H + P - stop_gradient(P)."""
  s = scores / jnp.maximum(tau, 1e-6)
  _, idx = jax.lax.top_k(scores, k)
  hard = jax.nn.one_hot(idx, scores.shape[-1])
  taken = jnp.zeros_like(scores)
  soft = []
  for j in range(k):
    soft.append(jax.nn.softmax(s + jnp.log(1 - jax.lax.stop_gradient(taken) + 1e-8), -1))
    taken = taken + hard[:, j]
  soft = jnp.stack(soft, 1)
  return hard + soft - jax.lax.stop_gradient(soft)


def _probe(weights):
  """A loss with a different weight per (slot, candidate), so every entry matters."""
  w = jnp.arange(weights.size, dtype=jnp.float32).reshape(weights.shape)
  return jnp.sum(jnp.sin(w) * weights)


SCORES = jax.random.normal(jax.random.key(0), (3, 7)) * 0.05


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("tau", [0.02, 1.0])
def test_matches_plain_formulation(k, tau):
  weights, idx = straight_through_topk(SCORES, k, tau)
  assert weights.dtype == jnp.float32 and weights.shape == (3, k, 7)
  assert idx.dtype == jnp.int32 and idx.shape == (3, k)
  # The plain formula is one-hot only up to rounding (H + P - P); ours is exact.
  np.testing.assert_allclose(weights, plain_topk(SCORES, k, tau), atol=1e-6)
  np.testing.assert_array_equal(idx, jax.lax.top_k(SCORES, k)[1])
  # Exactly one-hot, best first.
  assert set(np.unique(np.asarray(weights))) <= {0.0, 1.0}
  picked = jnp.take_along_axis(SCORES, idx, 1)
  assert bool(jnp.all(picked[:, :-1] >= picked[:, 1:]))
  g = jax.grad(lambda s: _probe(straight_through_topk(s, k, tau)[0]))(SCORES)
  g_ref = jax.grad(lambda s: _probe(plain_topk(s, k, tau)))(SCORES)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
  assert np.abs(g).max() > 0


def test_temperature_changes_gradients_not_selection():
  w1, i1 = straight_through_topk(SCORES, 3, 0.02)
  w2, i2 = straight_through_topk(SCORES, 3, 0.5)
  np.testing.assert_array_equal(w1, w2)
  np.testing.assert_array_equal(i1, i2)
  g1 = jax.grad(lambda s: _probe(straight_through_topk(s, 3, 0.02)[0]))(SCORES)
  g2 = jax.grad(lambda s: _probe(straight_through_topk(s, 3, 0.5)[0]))(SCORES)
  assert np.abs(g1 - g2).max() > 1e-3
  # A traced temperature works too (e.g. from a schedule) and gets no gradient.
  gt = jax.grad(lambda t: _probe(straight_through_topk(SCORES, 3, t)[0]))(0.1)
  assert float(gt) == 0.0


def test_ties_pick_lower_index_first():
  scores = jnp.array([[0.5, 0.9, 0.9, 0.1, 0.9]])
  _, idx = straight_through_topk(scores, 3)
  np.testing.assert_array_equal(idx, [[1, 2, 4]])
  g = jax.grad(lambda s: _probe(straight_through_topk(s, 3, 0.02)[0]))(scores)
  g_ref = jax.grad(lambda s: _probe(plain_topk(s, 3, 0.02)))(scores)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_minus_inf_candidates_are_masked():
  scores = jnp.array([[0.3, -jnp.inf, 0.1, -jnp.inf, 0.2], [-jnp.inf] * 5])
  weights, idx = straight_through_topk(scores, 4)
  # Finite candidates first (best first), then masked ones in index order.
  np.testing.assert_array_equal(idx[0], [0, 4, 2, 1])
  np.testing.assert_array_equal(idx[1], [0, 1, 2, 3])
  g = jax.grad(lambda s: _probe(straight_through_topk(s, 4, 0.02)[0]))(scores)
  assert bool(jnp.all(jnp.isfinite(g)))
  np.testing.assert_array_equal(g[0, jnp.array([1, 3])], 0.0)
  np.testing.assert_array_equal(g[1], 0.0)
  # Where the plain formula is defined (the first row), gradients agree.
  g_ref = jax.grad(lambda s: _probe(plain_topk(s, 4, 0.02)))(scores[:1])
  np.testing.assert_allclose(g[:1], jnp.nan_to_num(g_ref), atol=1e-6)


def test_nan_scores_raise_in_debug_mode():
  scores = SCORES.at[1, 2].set(jnp.nan)
  fn = checked(jax.jit(lambda s: straight_through_topk(s, 2, check_nans=True)[0]))
  with pytest.raises(Exception, match="NaN in retrieval scores"):
    fn(scores)
  np.testing.assert_array_equal(fn(SCORES), straight_through_topk(SCORES, 2)[0])


def test_bad_arguments():
  with pytest.raises(ValueError, match="k=8"):
    straight_through_topk(SCORES, 8)
  with pytest.raises(ValueError, match=r"\[batch, N\]"):
    straight_through_topk(SCORES[0], 2)


def test_vmap_pmap_and_sharded_jit_agree():
  scores = jax.random.normal(jax.random.key(1), (8, 2, 6))
  loss = lambda s: _probe(straight_through_topk(s, 2, 0.1)[0])
  ref_w = jnp.stack([straight_through_topk(s, 2, 0.1)[0] for s in scores])
  ref_g = jnp.stack([jax.grad(loss)(s) for s in scores])
  vm_w = jax.vmap(lambda s: straight_through_topk(s, 2, 0.1)[0])(scores)
  vm_g = jax.vmap(jax.grad(loss))(scores)
  np.testing.assert_array_equal(vm_w, ref_w)
  np.testing.assert_allclose(vm_g, ref_g, rtol=1e-5, atol=1e-5)
  pm_g = jax.pmap(jax.grad(loss))(scores)
  np.testing.assert_allclose(pm_g, ref_g, rtol=1e-5, atol=1e-5)
  # Sharded over the batch on an 8-device mesh.
  mesh = partitioning.make_mesh((-1, 1, 1))
  flat = scores.reshape(16, 6)
  sh = NamedSharding(mesh, P(("data", "fsdp"), None))
  g_sh = jax.jit(
    jax.grad(lambda s: _probe(straight_through_topk(s, 2, 0.1)[0])),
    in_shardings=sh,
    out_shardings=sh,
  )(jax.device_put(flat, sh))
  g_ref = jax.grad(lambda s: _probe(straight_through_topk(s, 2, 0.1)[0]))(flat)
  np.testing.assert_allclose(g_sh, g_ref, rtol=1e-5, atol=1e-5)
