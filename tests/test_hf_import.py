"""HF checkpoint import: numerical parity with transformers' Mistral/Llama, KV-cache decoding
with imported weights, the safetensors reader/writer, and the error messages.

torch and transformers are test extras; the reference models are tiny, random and built
from configs locally (no hub access).
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_fixtures import parity_config

from clara_jax import partitioning
from clara_jax.model import layout as param_layout
from clara_jax.model.config import (
  LoraConfig,
  RopeScaling,
  config_from_dict,
  config_to_dict,
  model_config,
)
from clara_jax.model.decoder import Decoder, abstract_params, init_cache, init_params
from clara_jax.weights import safetensors_io as st
from clara_jax.weights.hf_import import decoder_config_from_hf, import_hf_checkpoint, load_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
EXTRA = 5
LENGTHS = (12, 7, 3)  # right-padded batch of different lengths
TOL = 1e-4
LORA = LoraConfig(rank=4, alpha=8.0)
SMALL = parity_config(VOCAB, hidden_size=64)


def _build(model_cls, config, seed):
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  return model


def _saved(tmp_path_factory, name: str, model) -> str:
  """The directory of `model` saved as a safetensors checkpoint."""
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  """A tiny random Mistral with a RoPE base and a sliding window off the defaults, saved
  once as one file and once sharded."""
  config = transformers.MistralConfig(**SMALL, rope_theta=1e6, sliding_window=6)
  model = _build(transformers.MistralForCausalLM, config, seed=0)
  single = tmp_path_factory.mktemp("mistral_single")
  sharded = tmp_path_factory.mktemp("mistral_sharded")
  model.save_pretrained(single, safe_serialization=True)
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
  return model, str(single), str(sharded)


@pytest.fixture(scope="module")
def mistral_imported(mistral):
  _, single, _ = mistral
  return import_hf_checkpoint(single, EXTRA, lora=LORA, rng=jax.random.key(3))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tiny random Llama with tied input/output embeddings."""
  config = transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)
  model = _build(transformers.LlamaForCausalLM, config, seed=1)
  return model, _saved(tmp_path_factory, "llama_tied", model)


def _batch(seed, lengths=LENGTHS, length=None):
  """Right-padded token ids (padding id 0) and their attention mask, as numpy."""
  rng = np.random.default_rng(seed)
  length = length or max(lengths)
  ids = np.zeros((len(lengths), length), np.int32)
  mask = np.zeros((len(lengths), length), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(3, VOCAB, n)
    mask[i, :n] = 1
  return ids, mask


def _hf_logits(model, ids, mask):
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    )
  return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnames=("cfg", "adapter"))
def _forward(params, tokens, mask, cfg, adapter=None):
  """(hidden, logits) without a cache."""
  model = Decoder(cfg)
  hidden = model.apply({"params": params}, tokens, attention_mask=mask, adapter=adapter).hidden
  return hidden, model.apply({"params": params}, hidden, method=Decoder.logits)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _cached(params, tokens, cache, cache_index, cfg):
  """(hidden, logits, cache) with a KV cache."""
  model = Decoder(cfg)
  out = model.apply({"params": params}, tokens, cache=cache, cache_index=cache_index)
  return out.hidden, model.apply({"params": params}, out.hidden, method=Decoder.logits), out.cache


def _max_real_diff(ours, ref, lengths):
  """Max |ours - ref| over the real (unpadded) positions and the base vocabulary."""
  return max(
    float(np.abs(np.asarray(ours)[i, :n, :VOCAB] - ref[i, :n]).max()) for i, n in enumerate(lengths)
  )


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_mistral_logits_match_transformers(mistral, layout):
  model, single, sharded = mistral
  ckpt = single if layout == "single" else sharded
  if layout == "sharded":
    files = os.listdir(sharded)
    assert st.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
  cfg, params = import_hf_checkpoint(ckpt, EXTRA, lora=LORA, rng=jax.random.key(3))
  assert (cfg.rope_theta, cfg.sliding_window, cfg.vocab_size) == (1e6, 6, VOCAB + EXTRA)

  ids, mask = _batch(0)
  ref = _hf_logits(model, ids, mask)
  _, logits = _forward(params, ids, mask, cfg)
  assert logits.shape == (3, max(LENGTHS), VOCAB + EXTRA)
  diff = _max_real_diff(logits, ref, LENGTHS)
  print(f"mistral ({layout}) max abs logit diff: {diff:.3g}")
  assert diff < TOL

  # The comparison is sensitive to what it claims to test: dropping the sliding window
  # or the RoPE base moves the logits far beyond the tolerance.
  for wrong in (cfg.replace(sliding_window=None), cfg.replace(rope_theta=1e4)):
    assert _max_real_diff(_forward(params, ids, mask, wrong)[1], ref, LENGTHS) > 100 * TOL

  # B = 0 in every adapter: the imported model is the base model whichever is active.
  _, with_adapter = _forward(params, ids, mask, cfg, adapter="generator")
  assert _max_real_diff(with_adapter, ref, LENGTHS) < TOL


def test_sharded_and_single_imports_are_identical(mistral, mistral_imported):
  _, _, sharded = mistral
  _, single_params = mistral_imported
  _, sharded_params = import_hf_checkpoint(sharded, EXTRA, lora=LORA, rng=jax.random.key(3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, single_params, sharded_params)


def test_imported_tree_layout_and_extra_rows(mistral, mistral_imported):
  model, _, _ = mistral
  cfg, params = mistral_imported
  reference = init_params(cfg, jax.random.key(3))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  # Adapters are exactly init_params' (same rng), so B is zero.
  layer = params["layers_1"]["mlp"]["down_proj"]
  np.testing.assert_array_equal(
    layer["lora_reasoner"]["a"], reference["layers_1"]["mlp"]["down_proj"]["lora_reasoner"]["a"]
  )
  assert not np.any(np.asarray(layer["lora_reasoner"]["b"]))

  state = model.state_dict()
  np.testing.assert_array_equal(
    params["layers_1"]["attn"]["o_proj"]["kernel"],
    state["model.layers.1.self_attn.o_proj.weight"].numpy().T.reshape(4, 16, 64),
  )
  embed = state["model.embed_tokens.weight"].numpy()
  head = state["lm_head.weight"].numpy()
  extra_emb = np.asarray(params["embedder"]["extra_embedding"])
  extra_head = np.asarray(params["lm_head"]["extra_head"]).T
  for extra, rows in ((extra_emb, embed), (extra_head, head)):
    assert extra.shape == (EXTRA, 64)
    np.testing.assert_allclose(extra, np.broadcast_to(rows.mean(0), extra.shape), atol=1e-4)
    assert len({row.tobytes() for row in extra}) == EXTRA  # seeded noise keeps rows distinct
  assert params["embedder"]["base_embedding"].dtype == jnp.float32


def test_import_places_params_with_shardings(mistral, mistral_imported):
  _, single, _ = mistral
  _, reference = mistral_imported
  cfg = decoder_config_from_hf(load_hf_config(single), EXTRA, lora=LORA)
  mesh = partitioning.make_mesh((1, 2, 4))
  shardings = partitioning.logical_shardings(abstract_params(cfg), mesh)
  _, params = import_hf_checkpoint(
    single, EXTRA, lora=LORA, rng=jax.random.key(3), shardings=shardings
  )
  for path in (
    ("layers_0", "mlp", "up_proj", "kernel"),
    ("lm_head", "base_head"),
    ("layers_1", "attn", "q_proj", "lora_compressor", "a"),
  ):
    leaf, want = params, shardings
    for key in path:
      leaf, want = leaf[key], want[key]
    assert leaf.sharding == want, path
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)


def test_param_dtype_bfloat16(mistral):
  _, single, _ = mistral
  cfg, params = import_hf_checkpoint(
    single, EXTRA, lora=LORA, param_dtype="bfloat16", dtype="bfloat16"
  )
  assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_llama_with_tied_embeddings_matches_transformers(llama):
  model, path = llama
  assert "lm_head.weight" not in st.SafetensorsCheckpoint(path)
  cfg, params = import_hf_checkpoint(path, EXTRA, lora=LORA)
  assert cfg.rope_theta == 10000.0 and cfg.sliding_window is None
  np.testing.assert_array_equal(
    params["lm_head"]["base_head"], np.asarray(params["embedder"]["base_embedding"]).T
  )
  np.testing.assert_array_equal(
    params["lm_head"]["extra_head"], np.asarray(params["embedder"]["extra_embedding"]).T
  )
  ids, mask = _batch(1)
  diff = _max_real_diff(_forward(params, ids, mask, cfg)[1], _hf_logits(model, ids, mask), LENGTHS)
  print(f"llama (tied) max abs logit diff: {diff:.3g}")
  assert diff < TOL


def _hf_greedy(model, prompt, steps):
  """Greedy continuation of one unpadded prompt with transformers' own KV cache."""
  tokens, step_logits, past = [], [], None
  inputs = torch.from_numpy(prompt[None]).long()
  with torch.no_grad():
    for _ in range(steps):
      out = model(input_ids=inputs, past_key_values=past, use_cache=True)
      past = out.past_key_values
      step_logits.append(out.logits[0, -1].numpy())
      tokens.append(int(out.logits[0, -1].argmax()))
      inputs = torch.tensor([[tokens[-1]]])
  return tokens, step_logits


def _cache_greedy(params, cfg, prompt, steps):
  """Greedy tokens decoded one at a time through the KV cache after prefilling `prompt`."""
  cache = init_cache(cfg, 1, len(prompt) + steps)
  _, logits, cache = _cached(params, prompt[None], cache, jnp.zeros((1,), jnp.int32), cfg)
  tokens, position = [], len(prompt)
  for _ in range(steps):
    tokens.append(int(np.asarray(logits)[0, -1, :VOCAB].argmax()))
    _, logits, cache = _cached(
      params, np.asarray([[tokens[-1]]], np.int32), cache, jnp.asarray([position], jnp.int32), cfg
    )
    position += 1
  return tokens


def test_kv_cache_decoding_matches_recomputation_and_transformers(mistral, mistral_imported):
  model, _, _ = mistral
  cfg, params = mistral_imported
  prompt_lengths, steps = (6, 4, 2), 5
  max_len = max(prompt_lengths) + steps  # decoding runs past the sliding window of 6
  prompts, _ = _batch(2, prompt_lengths)
  batch = len(prompt_lengths)

  cache = init_cache(cfg, batch, max_len)
  hidden, logits, cache = _cached(params, prompts, cache, jnp.zeros((batch,), jnp.int32), cfg)
  full_ids, full_mask = _batch(2, prompt_lengths, length=max_len)
  ref_hidden, ref_logits = _forward(params, full_ids, full_mask, cfg)
  for i, n in enumerate(prompt_lengths):
    np.testing.assert_allclose(hidden[i, :n], ref_hidden[i, :n], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[i, :n], ref_logits[i, :n], atol=TOL, rtol=0)

  lengths = np.array(prompt_lengths)
  last = np.asarray(logits)[np.arange(batch), lengths - 1]
  ours_tokens, ours_logits, worst = [[] for _ in range(batch)], [[] for _ in range(batch)], 0.0
  for _ in range(steps):
    next_tokens = last[:, :VOCAB].argmax(-1)  # the base vocabulary, as HF's model has
    for i in range(batch):
      ours_tokens[i].append(int(next_tokens[i]))
      ours_logits[i].append(last[i, :VOCAB])
      full_ids[i, lengths[i]] = next_tokens[i]
      full_mask[i, lengths[i]] = 1
    # Each example appends at its own length.
    hidden, logits, cache = _cached(
      params, next_tokens[:, None].astype(np.int32), cache, jnp.asarray(lengths, jnp.int32), cfg
    )
    ref_hidden, ref_logits = _forward(params, full_ids, full_mask, cfg)
    rows = np.arange(batch)
    np.testing.assert_allclose(
      hidden[:, 0], np.asarray(ref_hidden)[rows, lengths], atol=TOL, rtol=0
    )
    np.testing.assert_allclose(
      logits[:, 0], np.asarray(ref_logits)[rows, lengths], atol=TOL, rtol=0
    )
    worst = max(worst, float(np.abs(logits[:, 0] - np.asarray(ref_logits)[rows, lengths]).max()))
    lengths = lengths + 1
    last = np.asarray(logits)[:, 0]

  hf_worst = 0.0
  for i, n in enumerate(prompt_lengths):
    hf_tokens, hf_logits = _hf_greedy(model, prompts[i, :n], steps)
    assert ours_tokens[i] == hf_tokens, f"example {i}"
    hf_worst = max(hf_worst, float(np.abs(np.stack(ours_logits[i]) - np.stack(hf_logits)).max()))
  print(f"cache vs recompute max abs logit diff: {worst:.3g}; vs HF greedy steps: {hf_worst:.3g}")
  assert hf_worst < TOL


# ---------------------------------------------------------------------------- errors


def _copy_checkpoint(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


@pytest.fixture
def ckpt(mistral, tmp_path):
  """A copy of the single-file Mistral checkpoint, free to damage."""
  _, single, _ = mistral
  return _copy_checkpoint(single, tmp_path / "ckpt")


@pytest.mark.parametrize(
  "removed, expected",
  [
    ("config.json", r"ckpt/config\.json: missing"),
    (
      "model.safetensors",
      r"ckpt: expected model\.safetensors\.index\.json .* or model\.safetensors",
    ),
  ],
)
def test_missing_file(ckpt, removed, expected):
  os.remove(os.path.join(ckpt, removed))
  with pytest.raises(FileNotFoundError, match=expected):
    import_hf_checkpoint(ckpt, EXTRA)


def test_missing_shard(mistral, tmp_path):
  _, _, sharded = mistral
  ckpt = _copy_checkpoint(sharded, tmp_path / "ckpt")
  with open(os.path.join(ckpt, st.INDEX_FILE)) as f:
    shard = json.load(f)["weight_map"]["model.norm.weight"]
  os.remove(os.path.join(ckpt, shard))
  expected = rf"{shard}: missing; .*index\.json lists it as the shard"
  with pytest.raises(FileNotFoundError, match=expected):
    import_hf_checkpoint(ckpt, EXTRA)


def test_unknown_architecture(ckpt):
  config = load_hf_config(ckpt)
  config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with open(os.path.join(ckpt, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM"):
    import_hf_checkpoint(ckpt, EXTRA)


def _rewrite_tensors(ckpt, edit):
  path = os.path.join(ckpt, "model.safetensors")
  tensors = {k: np.array(v) for k, v in st.load_safetensors(path).items()}
  edit(tensors)
  st.write_safetensors(path, tensors, {"format": "pt"})


def test_wrong_shape_names_the_tensor(ckpt):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite_tensors(ckpt, lambda t: t.update({name: np.zeros((130, 64), np.float32)}))
  with pytest.raises(ValueError, match=rf"'{name}' has shape \(130, 64\), expected \(128, 64\)"):
    import_hf_checkpoint(ckpt, EXTRA)


def test_missing_and_unused_tensors(mistral, tmp_path):
  _, single, _ = mistral
  ckpt = _copy_checkpoint(single, tmp_path / "ckpt")
  _rewrite_tensors(ckpt, lambda t: t.pop("model.layers.0.input_layernorm.weight"))
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.0\.input_layernorm"):
    import_hf_checkpoint(ckpt, EXTRA)

  ckpt = _copy_checkpoint(single, tmp_path / "ckpt2")
  _rewrite_tensors(
    ckpt,
    lambda t: t.update(
      {
        "model.layers.0.self_attn.q_proj.bias": np.zeros((64,), np.float32),
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros((8,), np.float32),
      }
    ),
  )
  expected = r"1 checkpoint tensor\(s\) not used.*\['model\.layers\.0\.self_attn\.q_proj\.bias'\]"
  with pytest.raises(ValueError, match=expected):
    import_hf_checkpoint(ckpt, EXTRA)


def test_truncated_safetensors(ckpt):
  path = os.path.join(ckpt, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(
    ValueError,
    match=r"model\.safetensors: tensor '.*' data_offsets .* "
    r"outside .*truncated",
  ):
    import_hf_checkpoint(ckpt, EXTRA)
  with open(path, "r+b") as f:
    f.truncate(5)
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
    st.SafetensorsFile(path)


# ------------------------------------------------------------------------ config parsing

BASE_HF_CONFIG = {
  "architectures": ["MistralForCausalLM"],
  "model_type": "mistral",
  "vocab_size": 96,
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "rms_norm_eps": 1e-5,
}


def test_config_defaults_and_old_style_rope_theta():
  cfg = decoder_config_from_hf({**BASE_HF_CONFIG, "head_dim": None}, 3, lora=None)
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.sliding_window) == (
    4,
    16,
    10000.0,
    None,
  )
  assert cfg.vocab_size == 99 and cfg.lora is None
  old = decoder_config_from_hf(
    {**BASE_HF_CONFIG, "rope_theta": 5e5, "rope_scaling": None, "sliding_window": 32}, 0
  )
  assert (old.rope_theta, old.sliding_window) == (5e5, 32)
  new = decoder_config_from_hf(
    {**BASE_HF_CONFIG, "rope_parameters": {"rope_theta": 2e4, "rope_type": "default"}}, 0
  )
  assert new.rope_theta == 2e4
  llama = decoder_config_from_hf(
    {
      **BASE_HF_CONFIG,
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "sliding_window": 8,
    },
    0,
  )
  assert llama.sliding_window is None  # Llama has no local attention


LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
  """A tiny random Llama-3 with its RoPE scaling, the original context (16) shorter than
  the test sequences so that the scaled frequencies matter."""
  config = transformers.LlamaConfig(
    **{**SMALL, "max_position_embeddings": 128}, rope_parameters={"rope_theta": 5e5, **LLAMA3_ROPE}
  )
  model = _build(transformers.LlamaForCausalLM, config, seed=2)
  return model, _saved(tmp_path_factory, "llama3", model)


def test_llama3_rope_scaling_matches_transformers_with_and_without_a_cache(llama3):
  """Logits of a padded batch against transformers (<= 1e-4), greedy decoding through
  the KV cache equal to transformers' own, and the scaling is read (without it the
  logits move by far more than the tolerance)."""
  model, path = llama3
  cfg, params = import_hf_checkpoint(path, EXTRA, lora=LORA)
  assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
  lengths = (40, 23, 9)
  ids, mask = _batch(4, lengths)
  ref = _hf_logits(model, ids, mask)
  diff = _max_real_diff(_forward(params, ids, mask, cfg)[1], ref, lengths)
  unscaled = _max_real_diff(
    _forward(params, ids, mask, cfg.replace(rope_scaling=None))[1], ref, lengths
  )
  print(f"llama3 max abs logit diff: {diff:.3g} (without the scaling: {unscaled:.3g})")
  assert diff < TOL and unscaled > 100 * TOL
  assert _cache_greedy(params, cfg, ids[0, :30], 6) == _hf_greedy(model, ids[0, :30], 6)[0]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """A tiny random Qwen2 (query/key/value biases, tied embeddings as in its small sizes),
  biases drawn non-zero so that a dropped bias would show."""
  config = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=1e6)
  model = _build(transformers.Qwen2ForCausalLM, config, seed=3)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("proj.bias"):
        p.copy_(0.5 * torch.randn_like(p))
  return model, _saved(tmp_path_factory, "qwen2", model)


def test_qwen2_biases_match_transformers_with_and_without_a_cache(qwen2):
  model, path = qwen2
  cfg, params = import_hf_checkpoint(path, EXTRA, lora=LORA)
  assert cfg.qkv_bias and cfg.rope_theta == 1e6 and cfg.sliding_window is None
  assert params["layers_0"]["attn"]["k_proj"]["bias"].shape == (2, 16)
  biases = sum(
    np.asarray(x).size
    for path, x in jax.tree_util.tree_leaves_with_path(params)
    if "bias" in jax.tree_util.keystr(path)
  )
  assert (
    biases
    == 2 * (4 + 2 + 2) * 16
    == (cfg.num_params(False) - cfg.replace(qkv_bias=False).num_params(False))
  )
  ids, mask = _batch(5)
  ref = _hf_logits(model, ids, mask)
  diff = _max_real_diff(_forward(params, ids, mask, cfg)[1], ref, LENGTHS)
  no_bias = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 0 if "bias" in jax.tree_util.keystr(path) else x, params
  )
  without = _max_real_diff(_forward(no_bias, ids, mask, cfg)[1], ref, LENGTHS)
  print(f"qwen2 max abs logit diff: {diff:.3g} (biases zeroed: {without:.3g})")
  assert diff < TOL and without > 100 * TOL
  scanned = cfg.replace(scan_layers=True)
  logits = _forward(param_layout.for_config(params, scanned), ids, mask, scanned)[1]
  assert _max_real_diff(logits, ref, LENGTHS) < TOL
  assert _cache_greedy(params, cfg, ids[0, :10], 5) == _hf_greedy(model, ids[0, :10], 5)[0]


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
  """A tiny random Phi-3: fused qkv_proj and gate_up_proj, a sliding window of 6."""
  config = transformers.Phi3Config(
    **SMALL, sliding_window=6, pad_token_id=0, tie_word_embeddings=False
  )
  model = _build(transformers.Phi3ForCausalLM, config, seed=4)
  return model, _saved(tmp_path_factory, "phi3", model)


def test_phi3_fused_projections_match_transformers_with_and_without_a_cache(phi3):
  model, path = phi3
  assert "model.layers.0.self_attn.qkv_proj.weight" in st.SafetensorsCheckpoint(path)
  cfg, params = import_hf_checkpoint(path, EXTRA, lora=LORA)
  assert cfg.sliding_window == 6 and not cfg.qkv_bias
  ids, mask = _batch(6)
  ref = _hf_logits(model, ids, mask)
  diff = _max_real_diff(_forward(params, ids, mask, cfg)[1], ref, LENGTHS)
  attn = params["layers_0"]["attn"]
  swapped = {
    **params,
    "layers_0": {
      **params["layers_0"],
      "attn": {**attn, "k_proj": attn["v_proj"], "v_proj": attn["k_proj"]},
    },
  }
  wrong = _max_real_diff(_forward(swapped, ids, mask, cfg)[1], ref, LENGTHS)
  print(f"phi3 max abs logit diff: {diff:.3g} (k and v swapped: {wrong:.3g})")
  assert diff < TOL and wrong > 100 * TOL
  assert _cache_greedy(params, cfg, ids[0, :10], 5) == _hf_greedy(model, ids[0, :10], 5)[0]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
  """A tiny random Gemma: GeGLU, embeddings scaled by sqrt(hidden) on input only (tied
  head), (1 + w) RMSNorm weights."""
  config = transformers.GemmaConfig(**{**SMALL, "head_dim": 16})
  model = _build(transformers.GemmaForCausalLM, config, seed=5)
  return model, _saved(tmp_path_factory, "gemma", model)


def test_gemma_matches_transformers_with_and_without_a_cache(gemma):
  model, path = gemma
  cfg, params = import_hf_checkpoint(path, EXTRA, lora=LORA)
  assert cfg.hidden_act == "gelu_tanh"
  ids, mask = _batch(7)
  ref = _hf_logits(model, ids, mask)
  diff = _max_real_diff(_forward(params, ids, mask, cfg)[1], ref, LENGTHS)
  silu = _max_real_diff(
    _forward(params, ids, mask, cfg.replace(hidden_act="silu"))[1], ref, LENGTHS
  )
  print(f"gemma max abs logit diff: {diff:.3g} (SiLU instead of GELU: {silu:.3g})")
  assert diff < TOL and silu > 100 * TOL
  # The input rows are scaled, the (tied) output head is not.
  np.testing.assert_allclose(
    np.asarray(params["embedder"]["base_embedding"]),
    8.0 * np.asarray(params["lm_head"]["base_head"]).T,
    rtol=1e-6,
  )
  assert _cache_greedy(params, cfg, ids[0, :10], 5) == _hf_greedy(model, ids[0, :10], 5)[0]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
  """A tiny random Gemma-2: local (window 6) and global layers alternating over 4 layers,
  soft caps low enough to bend the attention scores and the logits, a query scale off
  1 / sqrt(head_dim), and norms after attention and MLP as well as before."""
  config = transformers.Gemma2Config(
    **{**SMALL, "head_dim": 16, "num_hidden_layers": 4},
    sliding_window=6,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=3.0,
    query_pre_attn_scalar=24,
  )
  model = _build(transformers.Gemma2ForCausalLM, config, seed=8)
  return model, _saved(tmp_path_factory, "gemma2", model)


def test_gemma2_matches_transformers_with_and_without_a_cache(gemma2):
  """Logits of a padded batch longer than the window against transformers (<= 1e-4),
  unrolled and scanned; greedy decoding through the KV cache (either layout) equal to
  transformers' own; and every Gemma-2 feature is read: without it the logits move by
  far more than the tolerance."""
  model, path = gemma2
  cfg, params = import_hf_checkpoint(path, EXTRA, lora=LORA)
  assert (
    cfg.sliding_window,
    cfg.sliding_layer_pattern,
    cfg.attn_logit_softcapping,
    cfg.final_logit_softcapping,
    cfg.query_pre_attn_scalar,
    cfg.post_norms,
  ) == (6, (True, False), 5.0, 3.0, 24.0, True)
  assert cfg.windowed_layers == (True, False, True, False)
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == cfg.num_params()
  lengths = (20, 13, 5)
  ids, mask = _batch(8, lengths)
  ref = _hf_logits(model, ids, mask)
  hidden, logits = _forward(params, ids, mask, cfg)
  diff = _max_real_diff(logits, ref, lengths)
  scanned = cfg.replace(scan_layers=True)
  scanned_params = param_layout.for_config(params, scanned)
  scanned_diff = _max_real_diff(_forward(scanned_params, ids, mask, scanned)[1], ref, lengths)

  no_post_norms = {
    name: (
      {k: v for k, v in tree.items() if not k.endswith("post_norm")}
      if name.startswith("layers_")
      else tree
    )
    for name, tree in params.items()
  }
  controls = {
    "attention uncapped": (params, cfg.replace(attn_logit_softcapping=None)),
    "every layer local": (params, cfg.replace(sliding_layer_pattern=None)),
    "every layer global": (params, cfg.replace(sliding_window=None, sliding_layer_pattern=None)),
    "scaled by head_dim": (params, cfg.replace(query_pre_attn_scalar=None)),
    "no post-norms": (no_post_norms, cfg.replace(post_norms=False)),
  }
  moved = {
    name: _max_real_diff(_forward(p, ids, mask, c)[1], ref, lengths)
    for name, (p, c) in controls.items()
  }
  # The head without its cap needs no other compiled program.
  uncapped = np.asarray(hidden) @ np.asarray(params["lm_head"]["base_head"])
  moved["logits uncapped"] = _max_real_diff(uncapped, ref, lengths)
  print(
    f"gemma2 max abs logit diff: {diff:.3g} (scanned: {scanned_diff:.3g}); without "
    + ", ".join(f"{name}: {d:.3g}" for name, d in moved.items())
  )
  assert diff < TOL and scanned_diff < TOL
  assert all(d > 100 * TOL for d in moved.values()), moved
  # Past the window of 6: a prompt of 10, and (scanned) 12 steps after a one-token
  # prompt, whose prefill and steps share one compiled program.
  assert _cache_greedy(params, cfg, ids[0, :10], 5) == _hf_greedy(model, ids[0, :10], 5)[0]
  assert (
    _cache_greedy(scanned_params, scanned, ids[0, :1], 12) == _hf_greedy(model, ids[0, :1], 12)[0]
  )


def test_gemma2_2b_is_transformers_default_gemma2_config():
  """The named size is what `import-hf` makes of Gemma2Config's defaults (the 2B model),
  and survives the JSON round trip (its layer pattern comes back a tuple)."""
  hf = transformers.Gemma2Config().to_dict()
  cfg = decoder_config_from_hf(hf, 0, dtype="bfloat16", param_dtype="bfloat16")
  assert cfg == model_config("gemma2_2b")
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_rope_scaling_survives_the_config_round_trip():
  cfg = decoder_config_from_hf(
    {
      **BASE_HF_CONFIG,
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"},
    },
    0,
  )
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}


@pytest.mark.parametrize(
  "change, pattern",
  [
    (
      {"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn", "factor": 8.0}},
      r"'rope_parameters\.rope_type': expected 'default' or 'llama3', found 'yarn'",
    ),
    (
      {"rope_scaling": {"type": "linear", "factor": 2.0}},
      r"'rope_scaling\.rope_type': expected 'default' or 'llama3', found 'linear'",
    ),
    (
      {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
      r"'rope_parameters': rope_type 'llama3' needs \['low_freq_factor'",
    ),
    (
      {"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
      r"'rope_scaling': RopeScaling: need 0 < low_freq_factor < high_freq_factor",
    ),
    ({"attention_bias": True}, r"'attention_bias': expected False, found True"),
    ({"mlp_bias": True}, r"'mlp_bias': expected False, found True"),
    ({"hidden_act": "gelu"}, r"'hidden_act': expected 'silu', found 'gelu'"),
    (
      {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"},
      r"found architectures \['Gemma3ForCausalLM'\].*supported",
    ),
    (
      {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_act": "gelu"},
      r"'hidden_act': expected 'gelu_pytorch_tanh', found 'gelu'",
    ),
    (
      {**GEMMA2, "hidden_activation": "gelu"},
      r"'hidden_activation': expected 'gelu_pytorch_tanh', found 'gelu'",
    ),
    (
      {**GEMMA2, "layer_types": ["sliding_attention", "chunked_attention"]},
      r"'layer_types': expected 2 entries .*found \['sliding_attention', 'chunked",
    ),
    ({**GEMMA2, "sliding_window": None}, r"'sliding_window': expected a number, found None"),
    (
      {**GEMMA2, "final_logit_softcapping": "30"},
      r"'final_logit_softcapping': expected a number or null, found '30'",
    ),
    (
      {**GEMMA2, "use_bidirectional_attention": True},
      r"'use_bidirectional_attention': expected False, found True",
    ),
    (
      {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
      },
      r"'rope_scaling\.rope_type': expected 'default' or 'llama3', found 'longrope'",
    ),
    (
      {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True},
      r"'use_sliding_window': expected False, found True",
    ),
    ({"architectures": None, "model_type": "phi"}, r"found model_type 'phi'.*supported"),
    ({"hidden_size": None}, r"required field 'hidden_size'"),
  ],
)
def test_unsupported_config_values(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    decoder_config_from_hf({**BASE_HF_CONFIG, **change}, 0)


# --------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_with_the_reference_library(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  tensors = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "f16": np.array(3.5, np.float16),
    "bf16": (np.arange(4) / 3).astype(ml_dtypes.bfloat16).reshape(4, 1),
    "i64": np.arange(5, dtype=np.int64),
    "i32": np.array([-1, 2], ">i4"),  # big-endian input is stored little-endian
    "empty": np.zeros((0, 3), np.float32),
  }
  ours = str(tmp_path / "ours.safetensors")
  st.write_safetensors(ours, tensors, {"format": "np"})
  loaded = safetensors_torch.load_file(ours)
  assert loaded["bf16"].dtype == torch.bfloat16
  for name, value in tensors.items():
    np.testing.assert_array_equal(loaded[name].float().numpy(), value.astype(np.float32))
    assert tuple(loaded[name].shape) == value.shape

  theirs = str(tmp_path / "theirs.safetensors")
  safetensors_torch.save_file(
    {"w": torch.arange(4, dtype=torch.bfloat16) / 3, "x": torch.ones(2, 3, dtype=torch.float16)},
    theirs,
    metadata={"format": "pt"},
  )
  f = st.SafetensorsFile(theirs)
  assert f.metadata == {"format": "pt"} and sorted(f.keys()) == ["w", "x"]
  assert f.get("w").dtype == ml_dtypes.bfloat16 and not f.get("w").flags.writeable
  np.testing.assert_array_equal(
    f.get("w").astype(np.float32), (torch.arange(4, dtype=torch.bfloat16) / 3).float().numpy()
  )
  safetensors_numpy.save_file({"e": np.zeros((0,), np.float32)}, str(tmp_path / "e.st"))
  assert st.load_safetensors(str(tmp_path / "e.st"))["e"].shape == (0,)


def _raw_file(path, header: bytes, data: bytes = b""):
  with open(path, "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header + data)
  return str(path)


def _one_tensor_file(path, dtype: str, shape, data_offsets, data: bytes) -> str:
  """A safetensors file of one tensor 't' with the given header fields."""
  entry = {"dtype": dtype, "shape": shape, "data_offsets": data_offsets}
  return _raw_file(path, json.dumps({"t": entry}).encode(), data)


def test_safetensors_header_errors(tmp_path):
  bad_json = _raw_file(tmp_path / "a.safetensors", b"{not json")
  with pytest.raises(ValueError, match=r"a\.safetensors: bad safetensors header"):
    st.SafetensorsFile(bad_json)
  unknown = _one_tensor_file(tmp_path / "b.safetensors", "C64", [1], [0, 8], b"\0" * 8)
  with pytest.raises(ValueError, match=r"b\.safetensors: tensor 't': unknown dtype 'C64'"):
    st.SafetensorsFile(unknown)
  wrong_size = _one_tensor_file(tmp_path / "c.safetensors", "F32", [3], [0, 8], b"\0" * 8)
  with pytest.raises(ValueError, match=r"c\.safetensors: tensor 't'.*needs 12"):
    st.SafetensorsFile(wrong_size)
  outside = _one_tensor_file(tmp_path / "d.safetensors", "F32", [4], [8, 24], b"\0" * 16)
  with pytest.raises(
    ValueError,
    match=r"d\.safetensors: tensor 't' data_offsets \[8, 24\] "
    r"lie outside",
  ):
    st.SafetensorsFile(outside)
  huge = _raw_file(tmp_path / "e.safetensors", b"{}")
  with open(huge, "r+b") as f:
    f.write((10**6).to_bytes(8, "little"))
  with pytest.raises(ValueError, match=r"e\.safetensors: truncated"):
    st.SafetensorsFile(huge)
