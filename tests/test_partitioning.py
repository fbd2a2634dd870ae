"""Meshes, logical rules and a sharded forward pass equal to the unsharded one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clara_jax import partitioning
from clara_jax.model.config import model_config
from clara_jax.model.decoder import Decoder, abstract_params, init_params

# heads/kv_heads divisible by the tensor axis (4); "tiny" itself has 2 kv heads.
CFG = model_config("tiny", num_heads=8, num_kv_heads=4, head_dim=8, num_extra_tokens=5)


def test_resolve_mesh_shape():
  assert partitioning.resolve_mesh_shape((-1, 1, 4), 8) == (2, 1, 4)
  assert partitioning.resolve_mesh_shape((1, 2, 4), 8) == (1, 2, 4)
  with pytest.raises(ValueError, match="does not fit"):
    partitioning.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="at most one"):
    partitioning.resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="uses"):
    partitioning.resolve_mesh_shape((2, 2, 1), 8)


def _forward(cfg, params, toks, mask):
  model = Decoder(cfg)
  hidden = model.apply({"params": params}, toks, attention_mask=mask, adapter="generator").hidden
  return model.apply({"params": params}, hidden, method=Decoder.logits)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 2, 4)])
def test_sharded_forward_equals_unsharded(mesh_shape):
  assert jax.device_count() == 8
  params = init_params(CFG, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (4, 12), 0, CFG.vocab_size)
  mask = jnp.ones((4, 12), jnp.int32).at[1, 8:].set(0)
  ref = jax.jit(lambda p, t, m: _forward(CFG, p, t, m))(params, toks, mask)

  mesh = partitioning.make_mesh(mesh_shape)
  shardings = partitioning.logical_shardings(abstract_params(CFG), mesh)
  q_spec = shardings["layers_0"]["attn"]["q_proj"]["kernel"].spec
  assert q_spec == P("fsdp", "tensor", None)
  assert shardings["embedder"]["extra_embedding"].spec == P(None, "fsdp")
  data = partitioning.batch_sharding(mesh, 2)
  sharded_params = jax.device_put(params, shardings)
  assert len(sharded_params["layers_0"]["mlp"]["up_proj"]["kernel"].addressable_shards) == 8
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
    step = jax.jit(
      lambda p, t, m: _forward(CFG, p, t, m),
      in_shardings=(shardings, data, data),
      out_shardings=partitioning.batch_sharding(mesh, 3),
    )
    args = (sharded_params, jax.device_put(toks, data), jax.device_put(mask, data))
    # The block-boundary activation constraints reach the compiled program.
    assert "sharding_constraint" in str(step.trace(*args).jaxpr)
    out = step(*args)
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_indivisible_dimensions_fall_back_to_replication():
  cfg = model_config("tiny")  # 2 kv heads on a tensor axis of 4
  mesh = partitioning.make_mesh((1, 2, 4))
  shardings = partitioning.logical_shardings(abstract_params(cfg), mesh)
  assert shardings["layers_0"]["attn"]["k_proj"]["kernel"].spec == P("fsdp", None, None)
  assert shardings["layers_0"]["attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor", None)
  summary = partitioning.sharding_summary(shardings)
  assert any("k_proj" in k for k in summary)
