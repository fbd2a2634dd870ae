"""The compiled train step: trainable-only updates, gradient accumulation, non-finite
skipping, and jit (sharded) vs pmap giving the same losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clara_synth import KVWorld, model_cfg

from clara_jax import partitioning
from clara_jax.model import lora, stages
from clara_jax.model.clara import ClaraConfig
from clara_jax.model.config import LoraConfig
from clara_jax.model.decoder import abstract_params, init_params
from clara_jax.train import optimizer
from clara_jax.train.state import create_state
from clara_jax.train.step import (
  jit_train_step,
  make_train_step,
  pmap_train_step,
  replicate,
  state_shardings,
)

CLARA = ClaraConfig(doc_max_length=6, compr_rate=3, k=2)
# No LoRA dropout: jit and pmap draw dropout masks differently.
MODEL = model_cfg(CLARA.n_mem, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0))


def _setup(stage="stage2", accum=1, lr=1e-2, axis_name=None, lr_multipliers=()):
  params = init_params(MODEL, jax.random.key(0))
  mask = stages.trainable_mask(stage, params, CLARA)
  schedule = optimizer.learning_rate_schedule(lr, 20, "cosine", warmup_ratio=0.1)
  tx = optimizer.make_optimizer(schedule, lr_multipliers=lr_multipliers)
  step = make_train_step(
    stages.stage_loss(stage, MODEL, CLARA),
    tx,
    schedule,
    grad_accum_steps=accum,
    axis_name=axis_name,
  )
  return create_state(params, mask, tx), step, tx


def _batches(n, size=8, seed=0):
  world = KVWorld(12)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    b = world.stage2_batch(rng, size, 5, CLARA)
    b["truncated_docs"] = np.ones(size, np.int32)
    out.append(b)
  return out


def test_schedule_shapes():
  s = optimizer.learning_rate_schedule(1.0, 100, "cosine", warmup_ratio=0.1, final_ratio=0.1)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
  assert float(s(100)) == pytest.approx(0.1, abs=1e-6)
  c = optimizer.learning_rate_schedule(1.0, 100, "constant", warmup_ratio=0.0)
  assert float(c(0)) == float(c(99)) == 1.0
  with pytest.raises(ValueError, match="unknown schedule"):
    optimizer.learning_rate_schedule(1.0, 10, "linear")


def test_lr_multipliers_scale_the_matching_adapters_updates():
  """A stage2 step with the reasoner's lr tripled: the reasoner's parameters move exactly
  3x as far as without the multiplier, the generator's exactly as far."""
  batch = _batches(1)[0]
  moved = {}
  for mults in ((), ((".*/lora_reasoner/.*", 3.0),)):
    state, step, _ = _setup(lr_multipliers=mults)
    before = {k: np.asarray(v) for k, v in state.trainable.items()}
    # Two steps: the schedule's first learning rate is 0 (warm-up), so the second step
    # makes the whole move, from the initial parameters.
    step = jax.jit(step)
    new_state, _ = step(*step(state, batch)[:1], batch)
    moved[mults] = {k: np.asarray(v) - before[k] for k, v in new_state.trainable.items()}
  plain, tripled = moved[()], moved[((".*/lora_reasoner/.*", 3.0),)]
  reasoner = [k for k in plain if "/lora_reasoner/" in k]
  generator = [k for k in plain if "/lora_generator/" in k]
  assert reasoner and generator
  # LoRA's B starts at zero, so A gets no gradient at the first step; B moves.
  assert any(np.abs(plain[k]).max() > 0 for k in reasoner)
  for k in reasoner:
    np.testing.assert_allclose(tripled[k], 3.0 * plain[k], rtol=1e-5, atol=1e-9)
  for k in generator:
    np.testing.assert_array_equal(tripled[k], plain[k])


@pytest.mark.parametrize(
  "mults, message",
  [
    ((("lora_[", 2.0),), "is not a regex"),
    (((".*/lora_reasoner/.*", 0.0),), "must be a positive number"),
    (((".*/lora_reasonr/.*", 2.0),), "matches no trainable parameter"),
    (((".*/lora_reasoner/.*",),), "is not a \\(regex, multiplier\\) pair"),
  ],
)
def test_lr_multipliers_reject_what_cannot_apply(mults, message):
  paths = ["layers_0/attn/q_proj/lora_reasoner/a", "layers_0/attn/q_proj/lora_generator/a"]
  with pytest.raises(ValueError, match=message):
    optimizer.check_lr_multipliers(mults, paths)
  optimizer.check_lr_multipliers(((".*/lora_reasoner/.*", 2.0),), paths)


def test_frozen_regexes_take_parameters_out_of_the_trainable_set():
  cfg = model_cfg(2, lora=LoraConfig(rank=4, adapters=("compressor", "generator")))
  params = init_params(cfg, jax.random.PRNGKey(0))
  mask = lora.trainable_mask(params, base=True)
  kept = optimizer.freeze_by_path(mask, (".*/attn/.*", "embedder/.*"))
  flat, before = lora.flatten(kept), lora.flatten(mask)
  assert any(flat.values()) and flat.keys() == before.keys()
  for path, on in flat.items():
    frozen = "/attn/" in path or path.startswith("embedder/")
    assert on == (before[path] and not frozen), path
  assert flat["layers_0/mlp/up_proj/kernel"] and not flat["layers_0/attn/q_proj/kernel"]
  with pytest.raises(
    ValueError,
    match=r"optimizer.frozen\[1\] pattern '.\*/lora_x/.\*' "
    "matches no trainable parameter",
  ):
    optimizer.freeze_by_path(mask, (".*/attn/.*", ".*/lora_x/.*"))
  with pytest.raises(ValueError, match="is not a regex"):
    optimizer.freeze_by_path(mask, ("(",))


def test_step_updates_only_trainable_and_reports_metrics():
  state, step, _ = _setup()
  assert all("lora_reasoner/" in k or "lora_generator/" in k for k in state.trainable)
  frozen_before = jax.tree_util.tree_map(np.asarray, state.frozen)
  step = jax.jit(step)
  losses = []
  batch = _batches(1)[0]
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  assert int(state.step) == 4 and int(metrics["nonfinite"]) == 0
  assert int(metrics["truncated_docs"]) == 8 and float(metrics["grad_norm"]) > 0
  assert float(metrics["lr"]) > 0
  for k, v in state.frozen.items():
    np.testing.assert_array_equal(v, frozen_before[k])


def test_gradient_accumulation_matches_one_big_batch():
  batch = _batches(1)[0]
  s1, step1, _ = _setup(accum=1)
  s2, step2, _ = _setup(accum=4)
  s1, m1 = jax.jit(step1)(s1, batch)
  s2, m2 = jax.jit(step2)(s2, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
  for k in s1.trainable:
    np.testing.assert_allclose(s1.trainable[k], s2.trainable[k], atol=1e-6)


def test_nonfinite_update_is_skipped():
  state, step, _ = _setup()
  batch = dict(_batches(1)[0])
  bad = {k: v.copy() for k, v in state.trainable.items()}
  key = next(k for k in bad if "lora_reasoner" in k and k.endswith("/a"))
  bad[key] = bad[key].at[0, 0].set(jnp.nan)
  state = state.replace(trainable=bad)
  new_state, metrics = jax.jit(step)(state, batch)
  assert int(metrics["nonfinite"]) == 1 and int(new_state.step) == 1
  for k in state.trainable:
    np.testing.assert_array_equal(new_state.trainable[k], state.trainable[k])
  for a, b in zip(
    jax.tree_util.tree_leaves(new_state.opt_state), jax.tree_util.tree_leaves(state.opt_state)
  ):
    np.testing.assert_array_equal(a, b)


def test_sharded_jit_and_pmap_give_the_same_losses():
  batches = _batches(3, size=16)
  # jit over a (data=2, fsdp=2, tensor=2) mesh with NamedShardings.
  state, step, tx = _setup()
  mesh = partitioning.make_mesh((2, 2, 2))
  params_sh = lora.flatten(partitioning.logical_shardings(abstract_params(MODEL), mesh))
  abstract = jax.eval_shape(lambda: state)
  st_sh = state_shardings(abstract, params_sh, tx, mesh)
  batch_sh = {k: partitioning.batch_sharding(mesh, np.ndim(v)) for k, v in batches[0].items()}
  import flax.linen as nn

  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
    jstep = jit_train_step(step, mesh, st_sh, batch_sh)
    js = jax.device_put(state, st_sh)
    jit_losses = []
    for b in batches:
      js, m = jstep(js, jax.device_put(b, batch_sh))
      jit_losses.append(float(m["loss"]))
  assert js.trainable[next(iter(js.trainable))].sharding.mesh.shape["data"] == 2
  # pmap over the 8 devices: replicated state, batch split 8 ways.
  state, pstep_fn, _ = _setup(axis_name="batch")
  pstep = pmap_train_step(pstep_fn)
  n = jax.local_device_count()
  ps = replicate(state)
  pmap_losses = []
  for b in batches:
    local = {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in b.items()}
    ps, m = pstep(ps, local)
    pmap_losses.append(float(m["loss"][0]))
  assert int(m["truncated_docs"][0]) == 16
  np.testing.assert_allclose(pmap_losses, jit_losses, rtol=2e-4)
  assert jit_losses[-1] < jit_losses[0]
