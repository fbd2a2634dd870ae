"""Memory plan before paying for a pod: compile a stage's real train step ahead of time
for a named mesh of simulated devices and read XLA's per-device memory analysis.

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs
with the run's shardings, and `jit(...).lower(...).compile()` does the SPMD partitioning
exactly as on the pod (maxtext's train_compile idea). The host must expose the mesh's
device count, e.g. `XLA_FLAGS=--xla_force_host_platform_device_count=256` (the CLI
re-launches itself with it).
"""

from __future__ import annotations

import math
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clara_jax import partitioning
from clara_jax.model import lora, stages
from clara_jax.model.config import config_from_dict
from clara_jax.model.decoder import abstract_params
from clara_jax.train import optimizer
from clara_jax.train.state import TrainState, create_state
from clara_jax.train.step import jit_train_step, make_train_step, state_shardings

GIB = 1024**3


def abstract_batch(config, n_mem: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one global batch of the stage (int32 tokens and masks)."""
  d, b, c = config.data, config.train.global_batch, config.clara
  doc = c.doc_max_length + 3 + n_mem
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  if config.stage == "lm":
    return {"tokens": i32(b, d.lm_length), "mask": i32(b, d.lm_length)}
  gen_len = d.prompt_length + d.answer_length
  docs = {"stage1": 1, "stage1_2": c.k}.get(config.stage, d.candidates)
  k = 1 if config.stage == "stage1" else c.k
  batch = {"doc_tokens": i32(b, docs, doc), "doc_mask": i32(b, docs, doc),
           "gen_tokens": i32(b, gen_len), "gen_mask": i32(b, gen_len),
           "slot_positions": i32(b, k * n_mem), "answer_mask": i32(b, d.answer_length)}
  if config.stage in ("stage2", "stage2_retrieval"):
    q = d.question_max_length + 3 + n_mem
    batch.update(q_tokens=i32(b, q), q_mask=i32(b, q), positives=i32(b, docs))
  return batch


def _per_device_bytes(tree, shardings) -> float:
  total = 0.0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    shards = 1
    spec = getattr(sharding, "spec", ())
    for axes in spec:
      if axes is None:
        continue
      for name in (axes if isinstance(axes, tuple) else (axes,)):
        shards *= sharding.mesh.shape[name]
    total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize / shards
  return total


def memory_plan(config) -> Dict:
  """Compiles the stage's train step for `config.mesh.shape` on the visible devices."""
  from clara_jax.train.loop import clara_config
  cclara = clara_config(config)
  model_fields = config.model.to_dict()
  model_fields["num_extra_tokens"] = 3 + config.tokenizer.num_mem_tokens
  cfg = config_from_dict(model_fields)
  mesh = partitioning.make_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  boxed = abstract_params(cfg)
  params_sh = lora.flatten(partitioning.logical_shardings(boxed, mesh, rules))
  schedule = optimizer.learning_rate_schedule(config.optimizer.lr, config.train.num_steps,
                                              config.optimizer.schedule,
                                              config.optimizer.warmup_ratio)
  tx = optimizer.make_optimizer(schedule, config.optimizer.b1, config.optimizer.b2,
                                config.optimizer.weight_decay, config.optimizer.clip_norm,
                                lr_multipliers=config.optimizer.lr_multipliers)
  abstract = nn.meta.unbox(boxed)
  mask = stages.trainable_mask(config.stage, abstract, cclara)
  state_shape = jax.eval_shape(lambda p: create_state(p, mask, tx, config.seed), abstract)
  state_sh = state_shardings(state_shape, params_sh, tx, mesh)
  batch = abstract_batch(config, cclara.n_mem)
  batch_sh = {k: partitioning.batch_sharding(mesh, len(v.shape), rules)
              for k, v in batch.items()}
  step = make_train_step(stages.stage_loss(config.stage, cfg, cclara), tx, schedule,
                         config.train.grad_accum_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jit_train_step(step, mesh, state_sh, batch_sh).lower(
        jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                               state_shape, state_sh),
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
         for k, v in batch.items()}).compile()
  analysis = compiled.memory_analysis()
  params_b = _per_device_bytes(state_shape.trainable, state_sh.trainable) + _per_device_bytes(
      state_shape.frozen, state_sh.frozen)
  opt_b = _per_device_bytes(state_shape.opt_state, state_sh.opt_state)
  temp = float(analysis.temp_size_in_bytes)
  args = float(analysis.argument_size_in_bytes)
  out = float(analysis.output_size_in_bytes) - float(analysis.alias_size_in_bytes)
  total = args + temp + max(out, 0.0) + float(analysis.generated_code_size_in_bytes)
  return {"stage": config.stage, "model": config.model_size, "devices": jax.device_count(),
          "mesh": dict(mesh.shape), "global_batch": config.train.global_batch,
          "num_params": cfg.num_params(),
          "params_gib_per_device": params_b / GIB, "optimizer_gib_per_device": opt_b / GIB,
          "batch_gib_per_device": (args - params_b - opt_b) / GIB,
          "activations_temp_gib_per_device": temp / GIB,
          "total_gib_per_device": total / GIB}
