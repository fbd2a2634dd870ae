"""Decoder: paths (ids/embeddings, cache/no cache), masks, adapters, remat, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clara_jax.model import layers, lora
from clara_jax.model.config import DecoderConfig, LoraConfig, model_config
from clara_jax.model.decoder import Decoder, abstract_params, init_cache, init_params

CFG = model_config("tiny", num_extra_tokens=7)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def _apply(p, cfg=CFG, **kw):
  return Decoder(cfg).apply({"params": p}, **kw)


def _randomize_adapter(p, name, key=1, scale=0.05):
  """B = 0 makes a new adapter a no-op; give it weights so it changes outputs."""
  flat = lora.flatten(p)
  keys = iter(jax.random.split(jax.random.key(key), len(flat)))
  for path in flat:
    if f"lora_{name}/b" in path:
      flat[path] = scale * jax.random.normal(next(keys), flat[path].shape)
  return lora.unflatten(flat)


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def test_every_parameter_has_logical_axes():
  boxed = abstract_params(CFG)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
  shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.meta.unbox(boxed))
  assert shapes["embedder"]["extra_embedding"] == (7, CFG.hidden_size)
  assert shapes["lm_head"]["base_head"] == (CFG.hidden_size, CFG.base_vocab_size)
  assert (
    sum(
      int(np.prod(s))
      for s in jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    )
    == CFG.num_params()
  )


def test_tied_embeddings_decode_through_the_embedding_table():
  cfg = CFG.replace(tie_embeddings=True)
  p = init_params(cfg, jax.random.key(0))
  assert "lm_head" not in p
  assert sum(x.size for x in jax.tree_util.tree_leaves(p)) == cfg.num_params()
  assert cfg.num_params() == CFG.num_params() - CFG.vocab_size * CFG.hidden_size
  hidden = _apply(p, cfg, tokens=_tokens((2, 5))).hidden
  table = jnp.concatenate([p["embedder"]["base_embedding"], p["embedder"]["extra_embedding"]])
  logits = Decoder(cfg).apply({"params": p}, hidden, method=Decoder.logits)
  np.testing.assert_allclose(logits, hidden @ table.T, atol=1e-5)
  # The lens is final norm + the same tied head.
  lens = Decoder(cfg).apply({"params": p}, hidden, method=Decoder.lens_logits)
  normed = Decoder(cfg).apply({"params": p}, hidden, method=lambda m, x: m.final_norm(x))
  np.testing.assert_allclose(lens, normed @ table.T, atol=1e-5)
  # A loss on the logits trains the embedding rows, special rows included.
  grads = jax.grad(
    lambda q: Decoder(cfg).apply({"params": q}, hidden, method=Decoder.logits).sum()
  )(p)
  assert float(jnp.abs(grads["embedder"]["extra_embedding"]).sum()) > 0


def test_tokens_and_embeddings_paths_agree(params):
  toks = _tokens((2, 9))
  by_ids = _apply(params, tokens=toks).hidden
  emb = Decoder(CFG).apply({"params": params}, toks, method=Decoder.embed)
  by_emb = _apply(params, embeddings=emb).hidden
  np.testing.assert_allclose(by_ids, by_emb, atol=1e-6)
  # Extra (special-token) rows come from their own table.
  special = jnp.full((1, 1), CFG.base_vocab_size + 3)
  np.testing.assert_allclose(
    Decoder(CFG).apply({"params": params}, special, method=Decoder.embed)[0, 0],
    params["embedder"]["extra_embedding"][3],
  )
  logits = Decoder(CFG).apply({"params": params}, by_ids, method=Decoder.logits)
  assert logits.shape == (2, 9, CFG.vocab_size) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="exactly one"):
    _apply(params, tokens=toks, embeddings=emb)


def test_padding_does_not_change_real_positions(params):
  toks = _tokens((1, 6))
  ref = _apply(params, tokens=toks).hidden
  # Right padding: causality alone hides the pads from real tokens.
  right = jnp.concatenate([toks, jnp.zeros((1, 3), toks.dtype)], 1)
  mask = jnp.array([[1] * 6 + [0] * 3])
  out = _apply(params, tokens=right, attention_mask=mask).hidden
  np.testing.assert_allclose(out[:, :6], ref, atol=1e-5)
  # Left padding: needs the mask and shifted positions.
  left = jnp.concatenate([jnp.zeros((1, 3), toks.dtype), toks], 1)
  mask = jnp.array([[0] * 3 + [1] * 6])
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  out = _apply(params, tokens=left, attention_mask=mask, positions=positions).hidden
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)
  unmasked = _apply(params, tokens=left, positions=positions).hidden
  assert np.abs(unmasked[:, 3:] - ref).max() > 1e-3  # the mask matters


def test_kv_cache_decoding_matches_full_recomputation(params):
  p = _randomize_adapter(params, "generator")
  lengths = jnp.array([5, 3, 7])
  total = 11
  toks = _tokens((3, total), seed=4)
  # Prefill right-padded prompts, then decode each example at its own length.
  prompt_len = int(lengths.max())
  cache = init_cache(CFG, 3, 16)
  pre = _apply(
    p,
    tokens=toks[:, :prompt_len],
    adapter="generator",
    cache=cache,
    cache_index=jnp.zeros(3, jnp.int32),
  )
  cache, idx = pre.cache, lengths
  steps = []
  for _ in range(total - prompt_len):
    nxt = jnp.take_along_axis(toks, (idx)[:, None], 1)
    out = _apply(p, tokens=nxt, adapter="generator", cache=cache, cache_index=idx)
    cache, idx = out.cache, idx + 1
    steps.append(out.hidden[:, 0])
  for b in range(3):
    n = int(lengths[b])
    full = _apply(p, tokens=toks[b : b + 1, : n + len(steps)], adapter="generator").hidden[0]
    np.testing.assert_allclose(pre.hidden[b, :n], full[:n], atol=2e-5)
    np.testing.assert_allclose(jnp.stack([st[b] for st in steps]), full[n:], atol=2e-5)


def test_active_adapter_selects_only_its_weights(params):
  toks = _tokens((2, 8))
  base = _apply(params, tokens=toks).hidden
  for name in CFG.adapters:  # B = 0: every fresh adapter is a no-op
    np.testing.assert_allclose(_apply(params, tokens=toks, adapter=name).hidden, base, atol=1e-6)
  p = _randomize_adapter(params, "compressor")
  comp = _apply(p, tokens=toks, adapter="compressor").hidden
  assert np.abs(comp - base).max() > 1e-3
  np.testing.assert_allclose(_apply(p, tokens=toks, adapter="generator").hidden, base, atol=1e-6)
  with pytest.raises(ValueError, match="unknown adapter"):
    _apply(p, tokens=toks, adapter="nope")


def test_lora_dropout_only_in_training(params):
  p = _randomize_adapter(params, "reasoner")
  toks = _tokens((2, 8))
  run = lambda seed: _apply(
    p, tokens=toks, adapter="reasoner", deterministic=False, rngs={"dropout": jax.random.key(seed)}
  ).hidden
  np.testing.assert_allclose(run(0), run(0))
  assert np.abs(run(0) - run(1)).max() > 1e-4
  eval_out = _apply(p, tokens=toks, adapter="reasoner").hidden
  np.testing.assert_allclose(eval_out, _apply(p, tokens=toks, adapter="reasoner").hidden)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_values_and_gradients(params, policy):
  p = _randomize_adapter(params, "generator")
  toks = _tokens((2, 8))

  def loss(p, cfg):
    h = Decoder(cfg).apply({"params": p}, tokens=toks, adapter="generator").hidden
    # The last layer's read-out path is a static argument of the remat'd block too.
    tail = (
      Decoder(cfg).apply({"params": p}, tokens=toks, adapter="generator", readout=(-3, None)).hidden
    )
    return jnp.mean(Decoder(cfg).apply({"params": p}, h, method=Decoder.logits) ** 2) + jnp.mean(
      tail**2
    )

  ref_val, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, CFG)))(p)
  cfg = CFG.replace(remat_policy=policy)
  val, grad = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(p)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_tracks_float32(params):
  toks = _tokens((2, 8))
  ref = _apply(params, tokens=toks).hidden
  cfg = CFG.replace(dtype="bfloat16")
  out = _apply(params, cfg=cfg, tokens=toks).hidden
  assert out.dtype == jnp.bfloat16
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1
  bf16_params = init_params(CFG.replace(param_dtype="bfloat16"), jax.random.key(0))
  assert bf16_params["layers_0"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("layout", ["grouped", "per_kv_head"])
def test_attention_layouts_agree_in_values_and_gradients(params, layout):
  p = _randomize_adapter(params, "generator")
  toks = _tokens((2, 9))
  mask = jnp.ones((2, 9), jnp.int32).at[1, :3].set(0)

  def loss(p, cfg):
    h = (
      Decoder(cfg)
      .apply({"params": p}, tokens=toks, attention_mask=mask, adapter="generator")
      .hidden
    )
    return jnp.mean(jnp.sin(h))

  other = {"grouped": "per_kv_head", "per_kv_head": "grouped"}[layout]
  val, grad = jax.value_and_grad(loss)(p, CFG.replace(attention_layout=layout))
  ref_val, ref_grad = jax.value_and_grad(loss)(p, CFG.replace(attention_layout=other))
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_per_kv_head_attention_backward_tracks_autodiff_in_bfloat16(params):
  """The per-KV-head layout's own backward pass (probabilities kept in bf16) against
  plain autodiff of the grouped layout, both in bf16 compute: gradients agree to bf16
  precision, and both are within that of the float32 gradient."""
  p = _randomize_adapter(params, "generator")
  toks = _tokens((2, 33))
  mask = jnp.ones((2, 33), jnp.int32).at[1, :7].set(0)

  def grads(layout, dtype):
    cfg = CFG.replace(attention_layout=layout, dtype=dtype)
    loss = lambda p: jnp.mean(
      jnp.sin(
        Decoder(cfg)
        .apply({"params": p}, tokens=toks, attention_mask=mask, adapter="generator")
        .hidden.astype(jnp.float32)
      )
    )
    return jax.tree_util.tree_leaves(jax.grad(loss)(p))

  exact = grads("grouped", "float32")
  for got, want, ref in zip(grads("per_kv_head", "bfloat16"), grads("grouped", "bfloat16"), exact):
    scale = float(jnp.max(jnp.abs(ref))) + 1e-12
    assert float(jnp.max(jnp.abs(got - want))) / scale < 0.05
    assert float(jnp.max(jnp.abs(got - ref))) / scale < 0.05


def test_gemma2_blocks_params_and_soft_capped_attention_gradients():
  """Gemma-2's features: the post-norms add exactly the parameters `num_params` counts,
  and with scores pushed into the soft cap (queries scaled up), the per-KV-head layout's
  own backward pass matches the grouped layout's autodiff, where the cap moves the
  gradients by far more than the tolerance."""
  cfg = CFG.replace(
    sliding_window=3,
    sliding_layer_pattern=(True, False),
    attn_logit_softcapping=1.0,
    final_logit_softcapping=5.0,
    query_pre_attn_scalar=24.0,
    post_norms=True,
  )
  p = init_params(cfg, jax.random.key(0))
  assert sorted(p["layers_1"]) == [
    "attn",
    "attn_norm",
    "attn_post_norm",
    "mlp",
    "mlp_norm",
    "mlp_post_norm",
  ]
  assert sum(x.size for x in jax.tree_util.tree_leaves(p)) == cfg.num_params()
  assert cfg.num_params() - CFG.num_params() == 2 * cfg.num_layers * cfg.hidden_size
  p = _randomize_adapter(p, "generator")
  for layer in ("layers_0", "layers_1"):
    q_proj = p[layer]["attn"]["q_proj"]
    p[layer]["attn"]["q_proj"] = {**q_proj, "kernel": 8.0 * q_proj["kernel"]}
  toks = _tokens((2, 9))
  mask = jnp.ones((2, 9), jnp.int32).at[1, :3].set(0)

  def grads(cfg):
    def loss(p):
      model = Decoder(cfg)
      h = model.apply({"params": p}, tokens=toks, attention_mask=mask, adapter="generator").hidden
      return jnp.mean(jnp.sin(model.apply({"params": p}, h, method=Decoder.logits)))

    return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(p))

  want = grads(cfg.replace(attention_layout="grouped"))
  got = grads(cfg.replace(attention_layout="per_kv_head"))
  uncapped = grads(cfg.replace(attention_layout="per_kv_head", attn_logit_softcapping=None))
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(got, want)) < 1e-6
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(uncapped, want)) > 1e-4


def test_readout_computes_only_the_requested_positions(params):
  p = _randomize_adapter(params, "compressor")
  toks = _tokens((2, 10))
  mask = jnp.ones((2, 10), jnp.int32).at[0, :4].set(0)
  full = _apply(p, tokens=toks, attention_mask=mask, adapter="compressor").hidden
  for readout, want in (((-3, None), full[:, -3:]), ((2, 5), full[:, 2:5])):
    out = _apply(p, tokens=toks, attention_mask=mask, adapter="compressor", readout=readout).hidden
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, atol=1e-5)
  # The skipped positions still feed the last layer's keys and values.
  changed = toks.at[:, 0].set((toks[:, 0] + 1) % CFG.base_vocab_size)
  moved = _apply(p, tokens=changed, adapter="compressor", readout=(-3, None)).hidden
  assert (
    np.abs(moved - _apply(p, tokens=toks, adapter="compressor", readout=(-3, None)).hidden).max()
    > 1e-5
  )
  with pytest.raises(ValueError, match="no position"):
    _apply(p, tokens=toks, readout=(5, 5))
  with pytest.raises(ValueError, match="cache"):
    _apply(
      p,
      tokens=toks[:, :1],
      cache=init_cache(CFG, 2, 4),
      cache_index=jnp.zeros(2, jnp.int32),
      readout=(0, 1),
    )


def test_sliding_window_limits_receptive_field():
  cfg = CFG.replace(sliding_window=3)
  p = init_params(cfg, jax.random.key(0))
  toks = _tokens((1, 12))
  changed = toks.at[0, 0].set((toks[0, 0] + 1) % CFG.base_vocab_size)
  diff = np.abs(
    _apply(p, cfg=cfg, tokens=toks).hidden - _apply(p, cfg=cfg, tokens=changed).hidden
  ).max(-1)[0]
  # Two layers of window 3 reach back 2 * (3 - 1) = 4 positions.
  assert diff[:5].max() > 1e-4 and diff[5:].max() == 0.0
  full = np.abs(_apply(p, tokens=toks).hidden - _apply(p, tokens=changed).hidden).max(-1)[0]
  assert full[5:].max() > 1e-4


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    model_config("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    model_config("tiny", remat_policy="sometimes")
  with pytest.raises(ValueError, match="attention_layout"):
    model_config("tiny", attention_layout="diagonal")
  with pytest.raises(ValueError, match="attn_logit_softcapping must be None or a positive"):
    model_config("tiny", attn_logit_softcapping=0.0)
  with pytest.raises(ValueError, match="sliding_layer_pattern needs a sliding_window"):
    model_config("tiny", sliding_layer_pattern=(True, False))
  with pytest.raises(ValueError, match="sliding_layer_pattern must be a non-empty tuple"):
    model_config("tiny", sliding_window=4, sliding_layer_pattern=())
  assert model_config(
    "tiny", sliding_window=4, sliding_layer_pattern=[False, True]
  ).windowed_layers == (False, True)
  with pytest.raises(ValueError, match="unknown model size"):
    model_config("huge")
  with pytest.raises(ValueError, match="rank"):
    LoraConfig(rank=0)
  cfg = model_config("mistral_7b")
  assert isinstance(cfg, DecoderConfig)
  # Mistral-7B has 7.24B parameters.
  assert abs(cfg.num_params(include_lora=False) / 1e9 - 7.24) < 0.01


@pytest.mark.parametrize("rate,width", [(0.1, 256), (0.3, 7)])
def test_dropout_rate_scale_and_independence(rate, width):
  x = jnp.ones((64, 32, width), jnp.float32)
  out = np.asarray(layers.dropout(x, rate, jax.random.key(3)))
  p = layers.effective_dropout_rate(rate)
  assert abs(p - rate) <= 1 / 512
  dropped = out == 0
  # 64 * 32 * width draws: the observed rate is within 5 standard errors of p.
  n = dropped.size
  assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  np.testing.assert_allclose(out[~dropped], 1.0 / (1.0 - p), rtol=1e-6)
  # The four draws packed in one 32-bit word are not tied together: each position along
  # the last axis drops at the same rate, and neighbours' drops are uncorrelated.
  per_column = dropped.reshape(-1, width).mean(0)
  assert np.all(np.abs(per_column - p) < 6 * np.sqrt(p * (1 - p) / (n // width)))
  flat = dropped.reshape(-1, width).astype(np.float64)
  if width > (width + 3) // 4:
    quarter = (width + 3) // 4
    a, b = flat[:, 0], flat[:, quarter]  # the same word's first and second byte
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
  again = np.asarray(layers.dropout(x, rate, jax.random.key(3)))
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, np.asarray(layers.dropout(x, rate, jax.random.key(4))))


def test_dropout_rounds_tiny_rates_to_none():
  x = jnp.ones((4, 8))
  assert layers.effective_dropout_rate(1e-4) == 0.0
  np.testing.assert_array_equal(layers.dropout(x, 1e-4, jax.random.key(0)), x)


def _dot_operand_dtypes(fn, *args):
  """(lhs, rhs) dtypes of every dot_general in the jaxpr of `fn` (nested jaxprs too)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(v.aval.dtype for v in eqn.invars))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("n_in", [1, 2])
def test_mixed_matmul_values_gradients_and_backward_dtype(n_in):
  """bf16 `matmul`: float32 accumulation rounded once, gradients that track float32
  autodiff, and backward matmuls on bf16 operands (float32 ones run ~3x slower on the
  CPU); a float32 result (the LM head) differentiates the same way."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 5, 4, 8) if n_in == 2 else (3, 5, 32))
  w = jax.random.normal(kw, (4, 8, 16) if n_in == 2 else (32, 16))
  g = jax.random.normal(kg, x.shape[:-n_in] + (16,))
  bf = lambda a: a.astype(jnp.bfloat16)
  ref = layers.matmul(bf(x).astype(jnp.float32), bf(w).astype(jnp.float32), n_in, jnp.float32)
  out = layers.matmul(x, w, n_in, jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(bf(ref), np.float32))
  for out_dtype in (None, jnp.float32):
    loss = lambda x, w, out_dtype=out_dtype: jnp.sum(
      layers.matmul(x, w, n_in, jnp.bfloat16, out_dtype).astype(jnp.float32) * g
    )
    ref_loss = lambda x, w: jnp.sum(layers.matmul(x, w, n_in, jnp.float32) * g)
    grads = jax.grad(loss, argnums=(0, 1))(x, w)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1))(
      bf(x).astype(jnp.float32), bf(w).astype(jnp.float32)
    )
    for got, want, primal in zip(grads, ref_grads, (x, w)):
      assert got.dtype == primal.dtype  # the cast back to the float32 parameter
      scale = np.abs(np.asarray(want)).max()
      assert np.abs(np.asarray(got) - np.asarray(want)).max() < 2e-2 * scale
    dtypes = _dot_operand_dtypes(jax.grad(loss, argnums=(0, 1)), x, w)
    assert len(dtypes) == 3 and all(d == (jnp.bfloat16, jnp.bfloat16) for d in dtypes), dtypes
