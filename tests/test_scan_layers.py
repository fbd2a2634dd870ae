"""Scanned blocks (`DecoderConfig.scan_layers`) compute what the unrolled ones do:
forward, backward and cached decoding; the layouts convert both ways, exports are read
by either, folding and fingerprints agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clara_synth import model_cfg

from clara_jax.infer.generate import generate
from clara_jax.model import clara, layout, lora
from clara_jax.model.decoder import Decoder, abstract_params, init_params

N_MEM = 2
UNROLLED = model_cfg(N_MEM).replace(num_layers=3)
SCANNED = UNROLLED.replace(scan_layers=True)


def _perturbed(cfg):
  """Parameters with every adapter's B non-zero (fresh LoRA is a no-op)."""
  flat = lora.flatten(init_params(cfg, jax.random.key(0)))
  keys = iter(jax.random.split(jax.random.key(1), len(flat)))
  for path in flat:
    if path.endswith("/b"):
      flat[path] = 0.2 * jax.random.normal(next(keys), flat[path].shape)
  return lora.unflatten(flat)


@pytest.fixture(scope="module")
def params():
  unrolled = _perturbed(UNROLLED)
  return unrolled, layout.to_scanned(unrolled)


def _batch():
  tokens = jax.random.randint(jax.random.key(3), (2, 11), 4, UNROLLED.base_vocab_size)
  mask = jnp.ones((2, 11), jnp.int32).at[1, 8:].set(0)
  return tokens, mask


def test_layouts_convert_both_ways(params):
  unrolled, scanned = params
  fresh = init_params(SCANNED, jax.random.key(0))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(scanned)
  assert scanned["layers"]["attn"]["q_proj"]["kernel"].shape[0] == 3
  assert "layers_0" not in scanned and "layers" not in unrolled
  back = layout.to_unrolled(scanned)
  for path, value in lora.flatten(unrolled).items():
    np.testing.assert_array_equal(lora.flatten(back)[path], value, err_msg=path)
  names = abstract_params(SCANNED)["layers"]["mlp"]["up_proj"]["kernel"].names
  assert names[0] == "layers"
  with pytest.raises(ValueError, match="layers_0 .. layers_N expected"):
    layout.to_scanned({k: v for k, v in unrolled.items() if k != "layers_1"})


@pytest.mark.parametrize("adapter", [None, clara.COMPRESSOR])
@pytest.mark.parametrize("readout", [None, (-N_MEM, None)])
def test_forward_matches(params, adapter, readout):
  unrolled, scanned = params
  tokens, mask = _batch()
  run = (
    lambda cfg, p: Decoder(cfg)
    .apply({"params": p}, tokens, attention_mask=mask, adapter=adapter, readout=readout)
    .hidden
  )
  np.testing.assert_allclose(run(SCANNED, scanned), run(UNROLLED, unrolled), atol=2e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_backward_matches(params, remat):
  unrolled, scanned = params
  tokens, mask = _batch()

  def loss(cfg, p):
    hidden = (
      Decoder(cfg).apply({"params": p}, tokens, attention_mask=mask, adapter=clara.GENERATOR).hidden
    )
    logits = Decoder(cfg).apply({"params": p}, hidden, method=Decoder.logits)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

  grad = lambda cfg, p: jax.jit(jax.grad(lambda q: loss(cfg, q)))(p)
  want = lora.flatten(grad(UNROLLED.replace(remat_policy=remat), unrolled))
  got = lora.flatten(layout.to_unrolled(grad(SCANNED.replace(remat_policy=remat), scanned)))
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], atol=2e-5, rtol=1e-4, err_msg=path)
  assert any(float(jnp.abs(want[p]).max()) > 0 for p in want if "lora_generator" in p)


def test_cached_decoding_matches(params):
  unrolled, scanned = params
  tokens, mask = _batch()
  slots = jnp.asarray([[2, 3], [2, 3]])
  memories = jax.random.normal(jax.random.key(4), (2, 1, N_MEM, UNROLLED.hidden_size))
  run = lambda cfg, p: generate(
    p, cfg, tokens[:, :6], mask[:, :6], slots, memories, max_new_tokens=5, eos_id=-1
  )
  (got, got_len), (want, want_len) = run(SCANNED, scanned), run(UNROLLED, unrolled)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_len, want_len)


def test_folding_and_fingerprints_agree(params):
  from clara_jax.train.memory_cache import compressor_fingerprint

  unrolled, scanned = params
  folded = layout.to_unrolled(lora.fold_adapter(scanned, clara.COMPRESSOR, SCANNED.lora))
  want = lora.fold_adapter(unrolled, clara.COMPRESSOR, UNROLLED.lora)
  for path, value in lora.flatten(want).items():
    np.testing.assert_allclose(lora.flatten(folded)[path], value, atol=1e-6, err_msg=path)
  assert compressor_fingerprint(scanned) == compressor_fingerprint(unrolled)


def test_exports_are_unrolled_and_load_in_either_layout(params, tmp_path):
  from clara_jax.weights.export import load_params, save_params

  unrolled, scanned = params
  save_params(str(tmp_path / "scanned_run"), SCANNED, scanned)
  cfg, loaded = load_params(str(tmp_path / "scanned_run"))
  assert cfg.scan_layers and layout.is_scanned(loaded)
  save_params(str(tmp_path / "unrolled_run"), UNROLLED, unrolled)
  cfg, loaded_unrolled = load_params(str(tmp_path / "unrolled_run"))
  assert not cfg.scan_layers and "layers_2" in loaded_unrolled
  for path, value in lora.flatten(loaded_unrolled).items():
    np.testing.assert_array_equal(lora.flatten(layout.to_unrolled(loaded))[path], value)
