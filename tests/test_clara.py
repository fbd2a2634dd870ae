"""CLaRa roles (compress, reason, score, select, splice, generator loss) and stage losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clara_synth import BOS, ENC, EOS, PAD, KVWorld, mem_ids, model_cfg

from clara_jax.data import packing
from clara_jax.model import clara, lora, stages
from clara_jax.model.decoder import Decoder, init_params

CLARA = clara.ClaraConfig(doc_max_length=6, compr_rate=3, k=2)
MODEL = model_cfg(CLARA.n_mem)


@pytest.fixture(scope="module")
def params():
  p = init_params(MODEL, jax.random.key(0))
  flat = lora.flatten(p)
  keys = iter(jax.random.split(jax.random.key(1), len(flat)))
  for path in flat:  # give every adapter an effect
    if path.endswith("/b"):
      flat[path] = 0.05 * jax.random.normal(next(keys), flat[path].shape)
  return lora.unflatten(flat)


def test_num_memory_tokens():
  assert clara.num_memory_tokens(256, 16) == 16
  assert clara.num_memory_tokens(256, 256) == 1
  assert clara.num_memory_tokens(64, 1) == 64
  with pytest.raises(ValueError, match="multiple of compr_rate"):
    clara.num_memory_tokens(100, 16)
  with pytest.raises(ValueError, match=r"\[1, 256\]"):
    clara.num_memory_tokens(1024, 512)
  with pytest.raises(ValueError, match="multiple"):
    clara.ClaraConfig(doc_max_length=30, compr_rate=4)


def test_compress_is_independent_of_padding(params):
  model = Decoder(MODEL)
  texts = [[11, 45, 12, 46], [13, 47]]
  t_short, m_short, _ = packing.pack_encoder(texts, 8, mem_ids(2), ENC, BOS, EOS, PAD)
  t_long, m_long, _ = packing.pack_encoder(texts, 20, mem_ids(2), ENC, BOS, EOS, PAD)
  mem_s, mse_s = clara.compress(model, params, t_short, m_short, 2)
  mem_l, mse_l = clara.compress(model, params, t_long, m_long, 2)
  assert mem_s.shape == (2, 2, MODEL.hidden_size)
  np.testing.assert_allclose(mem_s, mem_l, atol=2e-5)
  np.testing.assert_allclose(mse_s, mse_l, rtol=1e-4)
  assert float(mse_s) > 0
  # Leading axes [B, N, L] flatten to B * N documents.
  mem_bn, _ = clara.compress(model, params, t_short[None], m_short[None], 2)
  np.testing.assert_allclose(mem_bn, mem_s, atol=1e-6)
  # The MSE compares the memory mean with the mean over attended non-memory states.
  _, hidden = clara.encode(model, params, t_short, m_short, 2, "compressor")
  h = np.asarray(hidden)
  doc_mean = np.stack([h[i, :-2][m_short[i, :-2] == 1].mean(0) for i in range(2)])
  want = np.mean((h[:, -2:].mean(1) - doc_mean) ** 2)
  np.testing.assert_allclose(mse_s, want, rtol=1e-5)
  # The memory-only path (last layer at the memory positions) gives the same memories.
  only = clara.memories(model, params, t_long, m_long, 2, "compressor")
  np.testing.assert_allclose(only, mem_l, atol=1e-5)
  only_bn = clara.memories(model, params, t_long[None], m_long[None], 2, "compressor")
  np.testing.assert_allclose(only_bn, only, atol=1e-6)


def test_pack_encoder_truncates_and_counts():
  tokens, mask, truncated = packing.pack_encoder([[5] * 10, [6]], 6, [200], ENC, BOS, EOS, PAD)
  assert truncated == 1
  np.testing.assert_array_equal(tokens[0], [ENC, BOS, 5, 5, 5, EOS, 200])
  np.testing.assert_array_equal(tokens[1], [PAD, PAD, ENC, BOS, 6, EOS, 200])
  np.testing.assert_array_equal(mask[1], [0, 0, 1, 1, 1, 1, 1])


def test_pack_generator_layout_and_errors():
  mems = [200, 201]
  prompt = [BOS, 3, 200, 201, 9, 200, 201, 9, 4]
  arrays, truncated = packing.pack_generator(
    [prompt], [[7, 8]], prompt_len=10, answer_len=4, mem_ids=mems, n_slots=2, eos_id=EOS, pad_id=PAD
  )
  assert truncated == 0
  np.testing.assert_array_equal(arrays["gen_tokens"][0], [PAD] + prompt + [7, 8, EOS, PAD])
  np.testing.assert_array_equal(arrays["slot_positions"][0], [3, 4, 6, 7])
  np.testing.assert_array_equal(arrays["answer_mask"][0], [1, 1, 1, 0])
  # Answers are cut keeping eos; prompts lose tokens on the left only.
  arrays, truncated = packing.pack_generator(
    [prompt],
    [[7, 8, 9, 10]],
    prompt_len=8,
    answer_len=3,
    mem_ids=mems,
    n_slots=2,
    eos_id=EOS,
    pad_id=PAD,
  )
  assert truncated == 1
  np.testing.assert_array_equal(arrays["gen_tokens"][0, -3:], [7, 8, EOS])
  with pytest.raises(ValueError, match="without cutting a memory slot"):
    packing.pack_generator(
      [prompt], [[7]], prompt_len=6, answer_len=3, mem_ids=mems, n_slots=2, eos_id=EOS, pad_id=PAD
    )
  with pytest.raises(ValueError, match="expected 3 slots"):
    packing.pack_generator(
      [prompt], [[7]], prompt_len=10, answer_len=3, mem_ids=mems, n_slots=3, eos_id=EOS, pad_id=PAD
    )


def test_score_select_splice():
  q = jax.random.normal(jax.random.key(0), (2, 3, 4))
  docs = jax.random.normal(jax.random.key(1), (2, 5, 3, 4))
  docs = docs.at[0, 2].set(q[0] * 3.0)  # same direction: cosine 1
  s = clara.score(q, docs)
  assert s.shape == (2, 5) and s.dtype == jnp.float32
  np.testing.assert_allclose(s[0, 2], 1.0, rtol=1e-6)
  flat_q = np.asarray(q[1]).ravel()
  flat_d = np.asarray(docs[1, 4]).ravel()
  np.testing.assert_allclose(
    s[1, 4], flat_q @ flat_d / np.linalg.norm(flat_q) / np.linalg.norm(flat_d), rtol=1e-5
  )
  weights = jax.nn.one_hot(jnp.array([[2, 0], [4, 1]]), 5)
  sel = clara.select(weights, docs)
  np.testing.assert_array_equal(sel[0, 0], docs[0, 2])
  np.testing.assert_array_equal(sel[1, 1], docs[1, 1])
  emb = jnp.zeros((2, 7, 4))
  pos = jnp.array([[1, 2, 4], [0, 5, 6]])
  mem = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
  out = clara.splice(emb, pos, mem)
  np.testing.assert_array_equal(out[0, 4], mem[0, 2])
  np.testing.assert_array_equal(out[1, 0], mem[1, 0])
  assert float(jnp.abs(out[0, 0]).sum()) == 0.0
  g = jax.grad(lambda m: jnp.sum(clara.splice(emb, pos, m) * 2.0))(mem)
  np.testing.assert_array_equal(g, 2.0)


def test_generator_loss_matches_full_logits(params):
  world = KVWorld(10)
  batch = world.stage1_batch(np.random.default_rng(0), 3, CLARA)
  model = Decoder(MODEL)
  mem, _ = clara.compress(model, params, batch["doc_tokens"], batch["doc_mask"], CLARA.n_mem)
  mem = mem.reshape(3, 1, CLARA.n_mem, -1)
  ce, count = clara.generator_loss(
    model,
    params,
    batch["gen_tokens"],
    batch["gen_mask"],
    batch["slot_positions"],
    mem,
    batch["answer_mask"],
  )
  # Reference: splice by hand, full logits, CE over the answer positions.
  emb = np.array(model.apply({"params": params}, batch["gen_tokens"], method=Decoder.embed))
  for b in range(3):
    emb[b, batch["slot_positions"][b]] = np.asarray(mem[b, 0])
  mask = batch["gen_mask"]
  hidden = model.apply(
    {"params": params},
    embeddings=jnp.asarray(emb),
    attention_mask=mask,
    positions=clara.positions_from_mask(mask),
    adapter="generator",
  ).hidden
  logp = jax.nn.log_softmax(model.apply({"params": params}, hidden, method=Decoder.logits))
  a = batch["answer_mask"].shape[1]
  t = batch["gen_tokens"].shape[1]
  nll = []
  for b in range(3):
    for j in range(a):
      if batch["answer_mask"][b, j]:
        nll.append(-logp[b, t - a - 1 + j, batch["gen_tokens"][b, t - a + j]])
  np.testing.assert_allclose(ce, np.mean(nll), rtol=1e-5)
  assert int(count) == len(nll)


def test_memories_enter_the_generator_at_the_embedding_scale(params):
  """memory_scale="embedding": each memory vector is rescaled to the RMS of the token
  embedding table before the generator reads it, and the loss equals the unscaled one on
  memories scaled so by hand; the unscaled loss differs once memories are oversized."""
  world = KVWorld(10)
  batch = world.stage1_batch(np.random.default_rng(0), 3, CLARA)
  model = Decoder(MODEL)
  mem, _ = clara.compress(model, params, batch["doc_tokens"], batch["doc_mask"], CLARA.n_mem)
  mem = 40.0 * mem.reshape(3, 1, CLARA.n_mem, -1)
  table = np.asarray(lora.flatten(params)["embedder/base_embedding"], np.float64)
  target = np.sqrt(np.mean(table**2))
  np.testing.assert_allclose(
    model.apply({"params": params}, method=Decoder.embedding_rms), target, rtol=1e-5
  )
  scaled = clara.rescale_memories(mem, target)
  rms = np.sqrt(np.mean(np.square(np.asarray(scaled, np.float64)), -1))
  np.testing.assert_allclose(rms, target, rtol=1e-5)
  cos = np.sum(np.asarray(scaled) * np.asarray(mem), -1) / (
    np.linalg.norm(scaled, axis=-1) * np.linalg.norm(mem, axis=-1)
  )
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
  args = (batch["gen_tokens"], batch["gen_mask"], batch["slot_positions"])
  ce_scaled, _ = clara.generator_loss(
    model, params, *args, mem, batch["answer_mask"], memory_scale="embedding"
  )
  ce_by_hand, _ = clara.generator_loss(model, params, *args, scaled, batch["answer_mask"])
  ce_raw, _ = clara.generator_loss(model, params, *args, mem, batch["answer_mask"])
  np.testing.assert_allclose(ce_scaled, ce_by_hand, rtol=1e-5)
  assert abs(float(ce_raw) - float(ce_scaled)) > 1e-3
  with pytest.raises(ValueError, match="memory_scale must be one of"):
    clara.ClaraConfig(memory_scale="layer_norm")


def test_stage2_cached_memories_equal_recomputed(params):
  world = KVWorld(12)
  batch = world.stage2_batch(np.random.default_rng(0), 4, 5, CLARA)
  loss_fn = stages.stage_loss("stage2", MODEL, CLARA)
  model = Decoder(MODEL)
  mem, _ = clara.compress(model, params, batch["doc_tokens"], batch["doc_mask"], CLARA.n_mem)
  cached = {k: v for k, v in batch.items() if k not in ("doc_tokens", "doc_mask")}
  cached["doc_mem"] = mem.reshape(4, 5, CLARA.n_mem, -1)
  (l1, m1), g1 = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
  (l2, m2), g2 = jax.value_and_grad(loss_fn, has_aux=True)(params, cached, None)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for key in ("recall@1", "recall@2", "selected_score", "selection_entropy"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The frozen compressor gets no gradient; reasoner and generator do.
  g = lora.split_adapters(g1)[1]
  norm = lambda t: sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(t))
  assert norm(g["compressor"]) == 0.0
  assert norm(g["reasoner"]) > 0 and norm(g["generator"]) > 0
  # With train_compressor the compressor is trained through the same loss.
  cfg = clara.ClaraConfig(doc_max_length=6, compr_rate=3, k=2, train_compressor=True)
  g3 = jax.grad(lambda p: stages.stage_loss("stage2", MODEL, cfg)(p, batch, None)[0])(params)
  assert norm(lora.split_adapters(g3)[1]["compressor"]) > 0


def test_retrieval_metrics_and_infonce():
  scores = jnp.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
  pos = jnp.array([[0, 0, 1, 0], [0, 1, 1, 0]])
  _, idx = jax.lax.top_k(scores, 2)
  m = stages.retrieval_metrics(scores, idx, pos)
  # q0: top2 = {0, 2}: 1 of 1 positive at k=2, 0 at k=1; q1: top2 = {1, 2}: both.
  np.testing.assert_allclose(m["recall@1"], (0 + 0.5) / 2)
  np.testing.assert_allclose(m["recall@2"], (1 + 1) / 2)
  from clara_jax.ops import infonce_loss

  tau = 0.1
  logits = np.asarray(scores) / tau
  lse = lambda x: np.log(np.sum(np.exp(x)))
  want = np.mean([lse(logits[0]) - logits[0, 2], lse(logits[1]) - lse(logits[1, [1, 2]])])
  np.testing.assert_allclose(infonce_loss(scores, pos, tau), want, rtol=1e-5)
  # Questions without positives are ignored rather than producing NaN.
  np.testing.assert_allclose(
    infonce_loss(scores, pos.at[1].set(0), tau), lse(logits[0]) - logits[0, 2], rtol=1e-5
  )


STAGE_BATCHES = {
  "lm": lambda w, r: {
    "tokens": w.stage1_batch(r, 4, CLARA)["gen_tokens"],
    "mask": w.stage1_batch(r, 4, CLARA)["gen_mask"],
  },
  "stage1": lambda w, r: w.stage1_batch(r, 4, CLARA),
  "stage1_2": lambda w, r: w.stage1_batch(r, 4, CLARA),
  "stage2": lambda w, r: w.stage2_batch(r, 4, 5, CLARA),
  "stage2_retrieval": lambda w, r: w.stage2_batch(r, 4, 5, CLARA),
}


@pytest.mark.parametrize("stage", stages.STAGES)
def test_each_stage_trains_only_its_parameters(params, stage):
  world = KVWorld(12)
  rng = np.random.default_rng(0)
  loss_fn = stages.stage_loss(stage, MODEL, CLARA)
  mask = stages.trainable_mask(stage, params, CLARA)
  tx = optax.chain(
    optax.masked(optax.adam(1e-2), mask),
    optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda m: not m, mask)),
  )

  @jax.jit
  def step(p, s, batch, key):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, metrics

  p, s = params, tx.init(params)
  batch = STAGE_BATCHES[stage](world, rng)
  first = None
  for i in range(4):
    p, s, loss, metrics = step(p, s, batch, jax.random.key(i))
    first = loss if first is None else first
    assert np.isfinite(float(loss))
  assert float(loss) < float(first)  # the same batch, so the loss must go down
  before, after = lora.flatten(params), lora.flatten(p)
  trained = {path for path, m in lora.flatten(mask).items() if m}
  expected = {
    "lm": lambda path: "lora_" not in path,
    "stage1": lambda path: any(f"lora_{a}/" in path for a in ("compressor", "generator"))
    or path == "embedder/extra_embedding",
    "stage1_2": lambda path: any(f"lora_{a}/" in path for a in ("compressor", "generator")),
    "stage2": lambda path: any(f"lora_{a}/" in path for a in ("reasoner", "generator")),
    "stage2_retrieval": lambda path: "lora_reasoner/" in path,
  }[stage]
  assert trained == {path for path in before if expected(path)}
  for path in before:
    if path not in trained:
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)
  moved = [path for path in trained if not np.array_equal(before[path], after[path])]
  assert moved, "nothing trained"
  if stage == "stage2":
    assert {"ce", "recall@1", "recall@2", "selected_score", "selection_entropy"} <= set(metrics)
  if stage in ("stage1", "stage1_2"):
    assert {"ce", "mse", "memory_cosine"} <= set(metrics)


def test_memory_cosine_is_one_for_a_collapsed_compressor():
  rng = np.random.default_rng(0)
  same = np.tile(rng.normal(size=(1, 12)), (4, 1))
  np.testing.assert_allclose(
    stages.memory_cosine(jnp.asarray(same * [[1], [2], [3], [4]])), 1.0, rtol=1e-6
  )
  distinct = rng.normal(size=(3, 12))
  unit = distinct / np.linalg.norm(distinct, axis=1, keepdims=True)
  gram = unit @ unit.T
  np.testing.assert_allclose(
    stages.memory_cosine(jnp.asarray(distinct)), (gram.sum() - 3) / 6, rtol=1e-5
  )


def test_memory_gain_reports_both_losses(params):
  world = KVWorld(12)
  batch = world.stage2_batch(np.random.default_rng(0), 4, 5, CLARA)
  out = stages.memory_gain(Decoder(MODEL), params, batch, CLARA, jax.random.key(0))
  np.testing.assert_allclose(out["memory_gain"], out["ce_control"] - out["ce_gold"])
  idx = stages.fixed_selection(jnp.asarray(batch["positives"]), 2, jax.random.key(1), gold=True)
  assert bool(jnp.all(jnp.take_along_axis(jnp.asarray(batch["positives"]), idx[:, :1], 1) == 1))
  idx = stages.fixed_selection(jnp.asarray(batch["positives"]), 2, jax.random.key(1), gold=False)
  assert bool(jnp.all(jnp.take_along_axis(jnp.asarray(batch["positives"]), idx, 1) == 0))


def test_replay_adds_the_base_lm_loss_of_the_replay_text(params):
  world = KVWorld(12)
  rng = np.random.default_rng(0)
  batch = world.stage1_batch(rng, 4, CLARA)
  replay = {"replay_tokens": batch["gen_tokens"], "replay_mask": batch["gen_mask"]}
  inner = stages.stage_loss("stage1", MODEL, CLARA)
  replayed = stages.with_replay(inner, MODEL, 0.5)
  lm_ce, _ = stages.lm_loss(
    Decoder(MODEL), params, {"tokens": replay["replay_tokens"], "mask": replay["replay_mask"]}
  )
  loss, metrics = replayed(params, {**batch, **replay})
  base_loss, _ = inner(params, batch, None)
  np.testing.assert_allclose(loss, base_loss + 0.5 * lm_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["replay_ce"], lm_ce, rtol=1e-5)
  same, same_metrics = replayed(params, batch)  # no replay text: the stage's loss alone
  np.testing.assert_allclose(same, base_loss, rtol=1e-6)
  assert "replay_ce" not in same_metrics
  # The replay gradient reaches the base (the stage updates it with clara.train_base).
  grads = jax.grad(lambda p: replayed(p, {**batch, **replay})[0])(params)
  base_grads = jax.grad(lambda p: inner(p, batch, None)[0])(params)
  path = "layers_0/mlp/up_proj/kernel"
  assert not np.allclose(lora.flatten(grads)[path], lora.flatten(base_grads)[path])


def test_lexical_loss_is_the_mixture_nll_of_each_distinct_document_token(params):
  model = Decoder(MODEL)
  rng = np.random.default_rng(0)
  n_mem, length = CLARA.n_mem, 7
  tokens = rng.integers(4, 20, size=(3, length + n_mem)).astype(np.int32)
  tokens[0, :3] = 9  # a repeated id counts once
  tokens[:, length:] = mem_ids(n_mem)
  mask = np.ones_like(tokens)
  mask[1, :2] = 0  # left padding is no target
  memories = jnp.asarray(rng.normal(size=(3, n_mem, MODEL.hidden_size)), jnp.float32)
  got = clara.lexical_loss(model, params, memories, jnp.asarray(tokens), jnp.asarray(mask))

  logits = np.asarray(model.apply({"params": params}, memories, method=Decoder.logits), np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  mix = np.log(np.exp(log_p).mean(1))  # [3, V]
  want = []
  for d in range(3):
    ids = {int(t) for t, m in zip(tokens[d, :length], mask[d, :length]) if m}
    want.append(-np.mean([mix[d, i] for i in ids]))
  np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)


def test_compression_loss_adds_the_weighted_lexical_loss(params):
  import dataclasses

  batch = STAGE_BATCHES["stage1"](KVWorld(12), np.random.default_rng(0))
  model = Decoder(MODEL)
  off, metrics_off = stages.compression_loss(model, params, batch, CLARA)
  on, metrics = stages.compression_loss(
    model, params, batch, dataclasses.replace(CLARA, lexical_weight=0.5)
  )
  assert "lexical" not in metrics_off and float(metrics["lexical"]) > 0
  np.testing.assert_allclose(float(on), float(off) + 0.5 * float(metrics["lexical"]), rtol=1e-5)
  with pytest.raises(ValueError, match="lexical_weight"):
    dataclasses.replace(CLARA, lexical_weight=-1.0)


def test_without_the_mse_only_the_memories_are_computed(params):
  import dataclasses

  batch = STAGE_BATCHES["stage1_2"](KVWorld(12), np.random.default_rng(0))
  model = Decoder(MODEL)
  with_mse, metrics = stages.compression_loss(model, params, batch, CLARA)
  without, metrics_off = stages.compression_loss(
    model, params, batch, dataclasses.replace(CLARA, mse_weight=0.0)
  )
  assert "mse" in metrics and "mse" not in metrics_off
  np.testing.assert_allclose(float(metrics_off["ce"]), float(metrics["ce"]), rtol=1e-5)
  np.testing.assert_allclose(float(without), float(metrics["ce"]), rtol=1e-5)
  np.testing.assert_allclose(
    float(with_mse), float(metrics["ce"]) + CLARA.mse_weight * float(metrics["mse"]), rtol=1e-5
  )
