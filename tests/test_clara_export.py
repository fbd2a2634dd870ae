"""`clara-jax export-clara`: a trained run in the official CLaRa (PyTorch) format, read
back by `import_official_clara` tensor for tensor and loaded the way the official
`CLaRa.from_pretrained` loads it (transformers + PEFT), with PyTorch's logits equal to
clara_jax's for every adapter."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from clara_jax import cli  # noqa: E402
from clara_jax.model import lora as lora_lib  # noqa: E402
from clara_jax.model.config import LoraConfig  # noqa: E402
from clara_jax.model.decoder import Decoder  # noqa: E402
from clara_jax.weights.clara_import import import_official_clara  # noqa: E402
from clara_jax.weights.export import save_params  # noqa: E402
from clara_jax.weights.hf_import import import_hf_checkpoint  # noqa: E402
from clara_jax.weights.layout import official_rows  # noqa: E402

V0, N_MEM, R, LAYERS, D, F = 96, 2, 4, 2, 32, 64
OFFICIAL = ("encoder_adapter", "query_reasoner_adapter", "decoder_adapter")
ROLES = dict(zip(OFFICIAL, ("compressor", "reasoner", "generator")))
# Every field of the official CLaRaConfig (openrlhf/models/modeling_clara.py), plus
# `pure_inference`, which its training script passes and from_pretrained reads.
CLARA_CONFIG_FIELDS = {
  "decoder_model_name",
  "doc_max_length",
  "quantization",
  "sep",
  "compr_model_name",
  "compr_rate",
  "compr_n_layers",
  "compr_every_n_layer",
  "compr_base_model_name",
  "compr_rms_norm",
  "compr_mlp_hidden_dim",
  "compr_use_mlp",
  "compr_linear_type",
  "lora",
  "lora_compressor",
  "training_form",
  "training_stage",
  "generation_top_k",
  "lora_r",
  "lora_r_compressor",
  "load_adapters",
  "kbtc_training",
  "optimize_mem_tokens",
  "different_mem_tokens",
  "attn_implementation",
  "_attn_implementation_autoset",
  "ae_mode",
  "max_new_tokens",
  "stage2_retrieval_top_n",
  "load_pretrained_checkpoint",
  "device_map",
  "auto_map",
  "pure_inference",
}


def _official_peft_config():
  """The official `_get_peft_config(lora_r)`."""
  return peft.LoraConfig(
    task_type="CAUSAL_LM", r=R, lora_alpha=2 * R, target_modules="all-linear", lora_dropout=0.1
  )


def _write_run(workdir, cfg, params, **clara):
  save_params(os.path.join(workdir, "export"), cfg, params)
  record = {"doc_max_length": 8, "compr_rate": 4, "k": 2, "stage": "stage2", **clara}
  with open(os.path.join(workdir, "export", "clara.json"), "w") as f:
    json.dump(record, f)
  return str(workdir)


def _randomized(params, seed, zero_reasoner=False):
  """Every LoRA factor and special-token row random and non-zero (B included, so each
  adapter moves the logits)."""
  rng = np.random.default_rng(seed)
  flat = lora_lib.flatten(params)
  for path, value in flat.items():
    if "/lora_" in path or "extra_" in path:
      new = rng.normal(0.0, 0.3, value.shape).astype(np.float32)
      if zero_reasoner and "/lora_reasoner/b" in path:
        new = np.zeros_like(new)
      flat[path] = jnp.asarray(new)
  return lora_lib.unflatten(flat)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.MistralConfig(
    vocab_size=V0,
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1e4,
    initializer_range=0.1,
  )
  path = str(tmp_path_factory.mktemp("base"))
  transformers.MistralForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
  return path


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
  cfg, params = import_hf_checkpoint(base, 3 + N_MEM, lora=LoraConfig(rank=R, alpha=2.0 * R))
  params = _randomized(params, seed=1)
  return _write_run(tmp_path_factory.mktemp("run"), cfg, params), cfg, params


def _export(workdir, out, capsys):
  assert cli.main(["export-clara", f"--workdir={workdir}", f"--out={out}"]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_round_trip_through_the_cli(base, run, tmp_path, capsys):
  workdir, cfg, params = run
  out = str(tmp_path / "official")
  info = _export(workdir, out, capsys)
  assert info["adapters"] == list(OFFICIAL) and info["training_stage"] == "stage2"
  assert info["dropped_mem_rows"] == 0 and info["lora_b_rescaled_by"] == 1.0
  assert sorted(os.listdir(out)) == ["adapters.pth", "config.json", "decoder_first_last_layers.pth"]
  cfg2, params2, got = import_official_clara(out, base)
  assert got == {"doc_max_length": 8, "compr_rate": 4, "n_mem": N_MEM}
  assert cfg2.num_extra_tokens == cfg.num_extra_tokens and cfg2.lora == cfg.lora
  want, back = lora_lib.flatten(params), lora_lib.flatten(params2)
  assert set(back) == set(want)
  for path in want:  # embeddings, heads, every factor of all three adapters
    np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(want[path]), err_msg=path)

  conf = json.load(open(os.path.join(out, "config.json")))
  assert set(conf) - {"model_type", "architectures"} == CLARA_CONFIG_FIELDS
  assert (conf["lora_r"], conf["doc_max_length"], conf["compr_rate"]) == (R, 8, 4)
  assert conf["lora"] and conf["different_mem_tokens"] and conf["model_type"] == "CLaRa"
  assert conf["training_stage"] == "stage2" and conf["generation_top_k"] == 2
  assert conf["decoder_model_name"] == "mistralai/Mistral-7B-Instruct-v0.2"


# Adding a second adapter to a transformers model makes PEFT warn; the official code does it.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_official_names_shapes_and_pytorch_logits(base, run, tmp_path, capsys):
  """The files load with weights_only=True under exactly the keys the official save
  writes (transformers' get_adapter_state_dict on the official PEFT config), and the
  official loading steps give PyTorch logits equal to clara_jax's per adapter."""
  workdir, cfg, params = run
  out = str(tmp_path / "official")
  _export(workdir, out, capsys)
  adapters = torch.load(os.path.join(out, "adapters.pth"), weights_only=True)
  first_last = torch.load(os.path.join(out, "decoder_first_last_layers.pth"), weights_only=True)
  assert set(adapters) == set(OFFICIAL)
  shapes = {
    "q": (D, D),
    "k": (D, D // 2),
    "v": (D, D // 2),
    "o": (D, D),
    "gate": (D, F),
    "up": (D, F),
    "down": (F, D),
  }
  expected = {}
  for i in range(LAYERS):
    for proj, (n_in, n_out) in shapes.items():
      block = "mlp" if proj in ("gate", "up", "down") else "self_attn"
      expected[f"model.layers.{i}.{block}.{proj}_proj.lora_A.weight"] = (R, n_in)
      expected[f"model.layers.{i}.{block}.{proj}_proj.lora_B.weight"] = (n_out, R)
  model = transformers.MistralForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
  for name in OFFICIAL:
    model.add_adapter(_official_peft_config(), adapter_name=name)
  for name, state in adapters.items():
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    official = model.get_adapter_state_dict(name)
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
  assert {k: tuple(v.shape) for k, v in first_last.items()} == {
    "model.embed_tokens.weight": (V0 + N_MEM + 3, D),
    "lm_head.weight": (V0 + N_MEM + 3, D),
  }

  # The official from_pretrained: base, resize to the new tokenizer, the first/last
  # layers (strict=False), then each adapter through transformers' load_adapter.
  model = transformers.MistralForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
  model.resize_token_embeddings(V0 + N_MEM + 3, mean_resizing=False)
  assert set(first_last) <= set(model.state_dict())
  model.load_state_dict(first_last, strict=False)
  for name, state in adapters.items():
    model.load_adapter(
      peft_config=_official_peft_config(), adapter_name=name, adapter_state_dict=state
    )
  model.eval()
  ref_ids = np.array([[1, 5, V0, V0 + 1, 7, V0 + 2, V0 + 3, V0 + 4, 9]])
  rows = official_rows(V0, N_MEM)
  to_ours = {int(r): V0 + i for i, r in enumerate(rows)}
  our_ids = np.vectorize(lambda t: to_ours.get(int(t), int(t)))(ref_ids)
  decoder = Decoder(cfg)
  for name in OFFICIAL:
    model.set_adapter(name)
    with torch.no_grad():
      want = model(torch.tensor(ref_ids)).logits.numpy()[0]
    hidden = decoder.apply({"params": params}, jnp.asarray(our_ids), adapter=ROLES[name]).hidden
    got = np.asarray(decoder.apply({"params": params}, hidden, method=Decoder.logits))[0]
    np.testing.assert_allclose(got[:, :V0], want[:, :V0], atol=1e-4, err_msg=name)
    np.testing.assert_allclose(got[:, V0:], want[:, rows], atol=1e-4, err_msg=name)


def test_alpha_other_than_two_r_is_rescaled(base, run, tmp_path, capsys):
  """A run with alpha = r: the official model (alpha = 2r) computes the same deltas."""
  _, cfg, params = run
  cfg = cfg.replace(lora=LoraConfig(rank=R, alpha=float(R)))
  workdir = _write_run(tmp_path / "run", cfg, params)
  info = _export(workdir, str(tmp_path / "official"), capsys)
  assert info["lora_b_rescaled_by"] == 0.5
  adapters = torch.load(tmp_path / "official" / "adapters.pth", weights_only=True)
  flat = lora_lib.flatten(params)
  for name, role in ROLES.items():
    for proj, module in (("q", "attn"), ("o", "attn"), ("down", "mlp")):
      key = f"model.layers.1.{'self_attn' if module == 'attn' else 'mlp'}.{proj}_proj"
      a, b = adapters[name][f"{key}.lora_A.weight"], adapters[name][f"{key}.lora_B.weight"]
      official_delta = 2.0 * (b @ a).numpy()  # [out, in]
      src = f"layers_1/{module}/{proj}_proj/lora_{role}"
      ours = cfg.lora.scale * (
        np.asarray(flat[f"{src}/a"]).reshape(-1, R) @ np.asarray(flat[f"{src}/b"]).reshape(R, -1)
      )
      np.testing.assert_allclose(official_delta, ours.T, atol=1e-6)


def test_untrained_reasoner_and_unused_memory_rows(base, run, tmp_path, capsys):
  """A stage1-like run: the reasoner never trained is left out (official stage1
  checkpoints hold encoder and decoder only), and memory-token rows beyond
  doc_max_length // compr_rate are dropped; the rest reads back unchanged."""
  _, cfg, params = run
  cfg = cfg.replace(num_extra_tokens=3 + N_MEM + 2)  # a tokenizer with 2 unused <MEM*>
  flat = lora_lib.flatten(params)
  flat["embedder/extra_embedding"] = jnp.concatenate(
    [flat["embedder/extra_embedding"], jnp.ones((2, D))], 0
  )
  flat["lm_head/extra_head"] = jnp.concatenate([flat["lm_head/extra_head"], jnp.ones((D, 2))], 1)
  params = _randomized(lora_lib.unflatten(flat), seed=2, zero_reasoner=True)
  workdir = _write_run(tmp_path / "run", cfg, params, stage="stage1")
  out = str(tmp_path / "official")
  info = _export(workdir, out, capsys)
  assert info["adapters"] == ["encoder_adapter", "decoder_adapter"]
  assert info["left_out"] == {"reasoner": "untrained (every B is zero)"}
  assert info["training_stage"] == "stage1" and info["dropped_mem_rows"] == 2
  assert json.load(open(os.path.join(out, "config.json")))["training_stage"] == "stage1"
  _, params2, _ = import_official_clara(out, base)
  want, back = lora_lib.flatten(params), lora_lib.flatten(params2)
  for path in ("embedder/extra_embedding", "lm_head/extra_head"):
    kept = np.asarray(want[path])
    kept = kept[: 3 + N_MEM] if path.startswith("embedder") else kept[:, : 3 + N_MEM]
    np.testing.assert_array_equal(np.asarray(back[path]), kept)
  for path in want:
    if "/lora_compressor/" in path or "/lora_generator/" in path:
      np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(want[path]))
    elif "/lora_reasoner/b" in path:
      assert not np.asarray(back[path]).any()


def test_bad_input_is_a_clear_error_and_nothing_is_overwritten(run, tmp_path, capsys):
  workdir, cfg, params = run
  empty = tmp_path / "empty_workdir"
  empty.mkdir()
  out = tmp_path / "out"
  assert cli.main(["export-clara", f"--workdir={empty}", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert f"{empty}/export: missing" in err and len(err.strip().splitlines()) == 1
  assert not out.exists()

  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  assert cli.main(["export-clara", f"--workdir={workdir}", f"--out={out}"]) == 2
  assert f"{out}: not empty" in capsys.readouterr().err
  assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"

  no_lengths = tmp_path / "no_lengths"
  save_params(str(no_lengths / "export"), cfg, params)
  assert cli.main(["export-clara", f"--workdir={no_lengths}", f"--out={tmp_path / 'o2'}"]) == 2
  assert f"{no_lengths}/export/clara.json: missing" in capsys.readouterr().err

  gemma = _write_run(tmp_path / "gemma", cfg.replace(hidden_act="gelu_tanh"), params)
  assert cli.main(["export-clara", f"--workdir={gemma}", f"--out={tmp_path / 'o3'}"]) == 2
  assert "Gemma" in capsys.readouterr().err
  assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
