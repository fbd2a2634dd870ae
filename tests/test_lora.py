"""LoRA helpers: split/merge, copy, fold, trainable masks with optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clara_jax.model import lora
from clara_jax.model.config import model_config
from clara_jax.model.decoder import Decoder, init_params

CFG = model_config("tiny", num_extra_tokens=5)


@pytest.fixture(scope="module")
def params():
  p = init_params(CFG, jax.random.key(0))
  flat = lora.flatten(p)
  keys = iter(jax.random.split(jax.random.key(3), len(flat)))
  for path in flat:  # non-zero B so adapters matter
    if path.endswith("/b"):
      flat[path] = 0.05 * jax.random.normal(next(keys), flat[path].shape)
  return lora.unflatten(flat)


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_split_and_merge_round_trip(params):
  base, adapters = lora.split_adapters(params)
  assert set(adapters) == set(CFG.adapters)
  assert not any("lora_" in p for p in lora.flatten(base))
  for name, tree in adapters.items():
    assert all(f"lora_{name}/" in p for p in lora.flatten(tree))
  merged = lora.merge_adapters(base, adapters)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
  assert _leaves_equal(merged, params)
  with pytest.raises(ValueError, match="another adapter"):
    lora.merge_adapters(base, {"compressor": adapters["generator"]})
  counts = lora.count_params(params)
  assert counts["compressor"] == counts["reasoner"] > 0
  assert sum(counts.values()) == CFG.num_params()


def test_copy_adapter_makes_reasoner_equal_compressor(params):
  toks = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG.vocab_size)
  run = lambda p, a: Decoder(CFG).apply({"params": p}, toks, adapter=a).hidden
  assert np.abs(run(params, "reasoner") - run(params, "compressor")).max() > 1e-4
  copied = lora.copy_adapter(params, "compressor", "reasoner")
  np.testing.assert_array_equal(run(copied, "reasoner"), run(copied, "compressor"))
  # The source and the other adapters are untouched.
  _, before = lora.split_adapters(params)
  _, after = lora.split_adapters(copied)
  assert _leaves_equal(before["compressor"], after["compressor"])
  assert _leaves_equal(before["generator"], after["generator"])
  with pytest.raises(ValueError, match="no parameters of adapter"):
    lora.copy_adapter(params, "missing", "reasoner")


def test_fold_adapter_equals_active_adapter(params):
  toks = jax.random.randint(jax.random.key(2), (2, 7), 0, CFG.vocab_size)
  model = Decoder(CFG)
  active = model.apply({"params": params}, toks, adapter="compressor").hidden
  folded = lora.fold_adapter(params, "compressor", CFG.lora)
  np.testing.assert_allclose(model.apply({"params": folded}, toks).hidden, active, atol=1e-5)


def test_trainable_mask_freezes_everything_else(params):
  mask = lora.trainable_mask(params, adapters=("reasoner", "generator"), extra_embedding=True)
  flat = lora.flatten(mask)
  trained = {p for p, m in flat.items() if m}
  assert "embedder/extra_embedding" in trained
  assert "embedder/base_embedding" not in trained
  assert all(
    ("lora_reasoner/" in p or "lora_generator/" in p)
    for p in trained
    if p != "embedder/extra_embedding"
  )
  assert any("lora_reasoner/" in p for p in trained)
  # Several optimizer steps: only the masked-in leaves move.
  tx = optax.chain(
    optax.masked(optax.adam(1e-2), mask),
    optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda m: not m, mask)),
  )
  toks = jax.random.randint(jax.random.key(4), (2, 7), 0, CFG.vocab_size)
  toks = toks.at[:, 0].set(CFG.base_vocab_size + 1)

  def loss(p):
    model = Decoder(CFG)
    h = model.apply({"params": p}, toks, adapter="reasoner").hidden
    h = h + model.apply({"params": p}, toks, adapter="generator").hidden
    return jnp.mean(model.apply({"params": p}, h, method=Decoder.logits) ** 2)

  state, p = tx.init(params), params
  for _ in range(3):
    grads = jax.grad(loss)(p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  before, after = lora.flatten(params), lora.flatten(p)
  for path in before:
    moved = not np.array_equal(before[path], after[path])
    assert moved == (path in trained), path


def test_trainable_mask_base_and_errors(params):
  flat = lora.flatten(lora.trainable_mask(params, base=True))
  assert all(m == ("lora_" not in p) for p, m in flat.items())
  with pytest.raises(ValueError, match="cannot train adapter"):
    lora.trainable_mask(params, adapters=("retriever",))
  no_extra = init_params(CFG.replace(num_extra_tokens=0), jax.random.key(0))
  with pytest.raises(ValueError, match="special-token rows"):
    lora.trainable_mask(no_extra, extra_embedding=True)
