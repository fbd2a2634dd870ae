"""`clara-jax export-hf`: one role's adapter merged into the base as a Hugging Face
checkpoint. transformers loads it, its float32 logits on a padded batch are clara_jax's
with that adapter active (and not with another), and `import-hf` reads the merged
weights back."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import parity_config  # noqa: E402

from clara_jax import cli  # noqa: E402
from clara_jax.model import lora as lora_lib  # noqa: E402
from clara_jax.model.config import LoraConfig  # noqa: E402
from clara_jax.model.decoder import Decoder  # noqa: E402
from clara_jax.weights.export import save_params  # noqa: E402
from clara_jax.weights.hf_import import import_hf_checkpoint  # noqa: E402

VOCAB, EXTRA = 96, 5
LENGTHS = (11, 6, 3)  # right-padded batch
TOL = 1e-4
LORA = LoraConfig(rank=4, alpha=8.0)
SMALL = parity_config(VOCAB, hidden_size=32)


def _hf_base(tmp_path_factory, name, model_cls, config, seed):
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():  # non-trivial norms and biases, so a misplaced one would show
    for n, p in model.named_parameters():
      if n.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif n.endswith(".bias"):
        p.copy_(0.3 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(path, safe_serialization=True)
  return path


def _run(base, workdir, seed):
  """A run started from `base` whose adapters and special-token rows all trained
  (random, non-zero)."""
  cfg, params = import_hf_checkpoint(base, EXTRA, lora=LORA)
  rng = np.random.default_rng(seed)
  flat = lora_lib.flatten(params)
  for path, value in flat.items():
    if "/lora_" in path or "extra_" in path:
      flat[path] = jnp.asarray(rng.normal(0.0, 0.3, value.shape).astype(np.float32))
  params = lora_lib.unflatten(flat)
  save_params(os.path.join(workdir, "export"), cfg, params)
  return str(workdir), cfg, params


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  config = transformers.MistralConfig(**SMALL, rope_theta=1e6, sliding_window=6)
  base = _hf_base(tmp_path_factory, "mistral", transformers.MistralForCausalLM, config, 0)
  return (base,) + _run(base, tmp_path_factory.mktemp("mistral_run"), seed=1)


def _batch(seed):
  """Right-padded ids over the whole vocabulary, special-token rows included."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(LENGTHS):
    ids[i, :n] = rng.integers(3, VOCAB + EXTRA, n)
    mask[i, :n] = 1
  return ids, mask


@functools.partial(jax.jit, static_argnames=("cfg", "adapter"))
def _logits(params, tokens, mask, cfg, adapter):
  model = Decoder(cfg)
  hidden = model.apply({"params": params}, tokens, attention_mask=mask, adapter=adapter).hidden
  return model.apply({"params": params}, hidden, method=Decoder.logits)


def _hf_logits(out, ids, mask):
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).logits.numpy()


def _max_diff(ours, ref):
  return max(
    float(np.abs(np.asarray(ours)[i, :n] - ref[i, :n]).max()) for i, n in enumerate(LENGTHS)
  )


def _export(capsys, *argv):
  assert cli.main(["export-hf", *argv]) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_transformers_logits_equal_the_role_and_import_gives_the_merged_weights(
  mistral, tmp_path, capsys
):
  base, workdir, cfg, params = mistral
  out = str(tmp_path / "generator")
  info = _export(
    capsys, f"--workdir={workdir}", "--role=generator", f"--out={out}", f"--base_config={base}"
  )
  assert info["model_type"] == "mistral" and info["vocab_size"] == VOCAB + EXTRA
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  conf = json.load(open(os.path.join(out, "config.json")))
  # The base's own fields are kept; the vocabulary counts the special tokens.
  assert conf["vocab_size"] == VOCAB + EXTRA and not conf["tie_word_embeddings"]
  assert conf["max_position_embeddings"] == 64 and conf["initializer_range"] == 0.15
  assert conf["sliding_window"] == 6 and conf["clara_jax"]["role"] == "generator"
  assert conf["clara_jax"]["special_tokens"] == ["<ENC>", "<SEP>", "<AE>", "<MEM0>", "<MEM1>"]

  ids, mask = _batch(0)
  ref = _hf_logits(out, ids, mask)
  assert ref.shape[-1] == VOCAB + EXTRA
  diff = _max_diff(_logits(params, ids, mask, cfg, "generator"), ref)
  other = _max_diff(_logits(params, ids, mask, cfg, "compressor"), ref)
  print(f"export-hf generator: max abs logit diff {diff:.3g}; compressor instead: {other:.3g}")
  assert diff <= TOL
  assert other > 100 * TOL  # the control: another role's adapter is far off

  cfg2, back = import_hf_checkpoint(out, 0, lora=None)
  assert cfg2.base_vocab_size == VOCAB + EXTRA and cfg2.sliding_window == 6
  merged = lora_lib.flatten(
    lora_lib.split_adapters(lora_lib.fold_adapter(params, "generator", cfg.lora))[0]
  )
  back = lora_lib.flatten(back)
  np.testing.assert_array_equal(
    back["embedder/base_embedding"],
    np.concatenate([merged.pop("embedder/base_embedding"), merged.pop("embedder/extra_embedding")]),
  )
  np.testing.assert_array_equal(
    back["lm_head/base_head"],
    np.concatenate([merged.pop("lm_head/base_head"), merged.pop("lm_head/extra_head")], 1),
  )
  assert set(merged) == set(back) - {"embedder/base_embedding", "lm_head/base_head"}
  for path, value in merged.items():
    np.testing.assert_array_equal(back[path], np.asarray(value), err_msg=path)


def test_config_built_from_the_run_with_qwen2_biases(tmp_path_factory, tmp_path, capsys):
  """Without --base_config the config comes from the run (Qwen2: its biases go back to
  q/k/v_proj.bias)."""
  config = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
  base = _hf_base(tmp_path_factory, "qwen2", transformers.Qwen2ForCausalLM, config, 2)
  workdir, cfg, params = _run(base, tmp_path / "run", seed=3)
  out = str(tmp_path / "reasoner")
  info = _export(capsys, f"--workdir={workdir}", "--role=reasoner", f"--out={out}")
  assert info["model_type"] == "qwen2"
  conf = json.load(open(os.path.join(out, "config.json")))
  assert conf["architectures"] == ["Qwen2ForCausalLM"] and conf["vocab_size"] == VOCAB + EXTRA
  ids, mask = _batch(1)
  ref = _hf_logits(out, ids, mask)
  assert _max_diff(_logits(params, ids, mask, cfg, "reasoner"), ref) <= TOL
  assert _max_diff(_logits(params, ids, mask, cfg, "generator"), ref) > 100 * TOL


def test_bad_input_is_a_clear_error_and_nothing_is_overwritten(mistral, tmp_path, capsys):
  base, workdir, cfg, params = mistral
  out = tmp_path / "out"
  assert cli.main(["export-hf", f"--workdir={workdir}", "--role=retriever", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert "argument --role: invalid choice: 'retriever'" in err
  assert len(err.strip().splitlines()) == 1

  empty = tmp_path / "empty_workdir"
  empty.mkdir()
  assert cli.main(["export-hf", f"--workdir={empty}", "--role=generator", f"--out={out}"]) == 2
  assert f"{empty}/export: missing" in capsys.readouterr().err

  out.mkdir()
  (out / "config.json").write_text("{}")
  assert cli.main(["export-hf", f"--workdir={workdir}", "--role=generator", f"--out={out}"]) == 2
  assert f"{out}: not empty" in capsys.readouterr().err
  assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "{}"

  two = tmp_path / "two_adapters"
  base_params, adapters = lora_lib.split_adapters(params)
  del adapters["reasoner"]
  save_params(
    str(two / "export"),
    cfg.replace(lora=LoraConfig(adapters=("compressor", "generator"), rank=4, alpha=8.0)),
    lora_lib.merge_adapters(base_params, adapters),
  )
  assert (
    cli.main(["export-hf", f"--workdir={two}", "--role=reasoner", f"--out={tmp_path / 'o2'}"]) == 2
  )
  assert "no 'reasoner' adapter (role)" in capsys.readouterr().err

  gemma = tmp_path / "gemma.json"
  gemma.write_text(
    json.dumps(
      {
        **json.load(open(os.path.join(base, "config.json"))),
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
      }
    )
  )
  assert (
    cli.main(
      [
        "export-hf",
        f"--workdir={workdir}",
        "--role=generator",
        f"--out={tmp_path / 'o3'}",
        f"--base_config={gemma}",
      ]
    )
    == 2
  )
  assert "'gemma' family is not exported" in capsys.readouterr().err

  other = tmp_path / "other.json"
  other.write_text(
    json.dumps({**json.load(open(os.path.join(base, "config.json"))), "rms_norm_eps": 1e-3})
  )
  assert (
    cli.main(
      [
        "export-hf",
        f"--workdir={workdir}",
        "--role=generator",
        f"--out={tmp_path / 'o4'}",
        f"--base_config={other}",
      ]
    )
    == 2
  )
  assert "rms_norm_eps=0.001, but the run's model has 1e-06" in capsys.readouterr().err
  assert not any((tmp_path / o).exists() for o in ("o2", "o3", "o4"))
