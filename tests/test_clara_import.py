"""Import of the official CLaRa checkpoint format: a tiny Mistral + three PEFT adapters
saved as the reference does, imported, with logits equal to PyTorch's per adapter."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_fixtures import tiny_sizes  # noqa: E402

from clara_jax.model.decoder import Decoder  # noqa: E402
from clara_jax.weights.clara_import import ADAPTER_NAMES, import_official_clara  # noqa: E402
from clara_jax.weights.layout import official_rows  # noqa: E402

V0, N_MEM, R = 96, 2, 4


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("official")
  cfg = transformers.MistralConfig(vocab_size=V0, **tiny_sizes(), rope_theta=1e4)
  model = transformers.MistralForCausalLM(cfg).eval()
  base_dir = str(root / "base")
  model.save_pretrained(base_dir, safe_serialization=True)
  model.resize_token_embeddings(V0 + N_MEM + 3, mean_resizing=False)
  with torch.no_grad():
    model.get_input_embeddings().weight[V0:] = torch.randn(N_MEM + 3, 32) * 0.5
    model.get_output_embeddings().weight[V0:] = torch.randn(N_MEM + 3, 32) * 0.5
  pc = peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules="all-linear")
  for name in ADAPTER_NAMES:
    model.add_adapter(pc, adapter_name=name)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lora_" in n:
        p.copy_(torch.randn_like(p) * 0.2)
  ckpt = root / "clara"
  ckpt.mkdir()
  torch.save(
    {name: model.get_adapter_state_dict(name) for name in ADAPTER_NAMES}, ckpt / "adapters.pth"
  )
  torch.save(
    {k: v for k, v in model.named_parameters() if "embed_tokens" in k or "lm_head" in k},
    ckpt / "decoder_first_last_layers.pth",
  )
  (ckpt / "config.json").write_text(json.dumps({"lora_r": R, "doc_max_length": 8, "compr_rate": 4}))
  return model, str(ckpt), base_dir


def test_logits_match_pytorch_for_every_adapter(official):
  model, ckpt, base_dir = official
  cfg, params, info = import_official_clara(ckpt, base_dir)
  assert info == {"doc_max_length": 8, "compr_rate": 4, "n_mem": N_MEM}
  # Reference ids: words plus every added token (MEM0, MEM1, AE, ENC, SEP).
  ref_ids = np.array([[1, 5, V0, V0 + 1, 7, V0 + 2, V0 + 3, V0 + 4, 9]])
  rows = official_rows(V0, N_MEM)
  to_ours = {int(r): V0 + i for i, r in enumerate(rows)}
  our_ids = np.vectorize(lambda t: to_ours.get(int(t), int(t)))(ref_ids)
  decoder = Decoder(cfg)
  for ref_name, ours in ADAPTER_NAMES.items():
    model.set_adapter(ref_name)
    with torch.no_grad():
      want = model(torch.tensor(ref_ids)).logits.numpy()[0]
    hidden = decoder.apply({"params": params}, jnp.asarray(our_ids), adapter=ours).hidden
    got = np.asarray(decoder.apply({"params": params}, hidden, method=Decoder.logits))[0]
    # Compare the base vocabulary and the added rows (reordered) separately.
    np.testing.assert_allclose(got[:, :V0], want[:, :V0], atol=1e-4)
    np.testing.assert_allclose(got[:, V0:], want[:, rows], atol=1e-4)


def test_bad_files_get_clear_errors(official, tmp_path):
  _, ckpt, base_dir = official
  import shutil

  bad = tmp_path / "bad"
  shutil.copytree(ckpt, bad)
  (bad / "adapters.pth").write_bytes(b"this is not a torch file")
  with pytest.raises(ValueError, match="adapters.pth: not a PyTorch weights file"):
    import_official_clara(str(bad), base_dir)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  torch.save({"x": Evil()}, bad / "adapters.pth")
  with pytest.raises(ValueError, match="not a PyTorch weights file"):
    import_official_clara(str(bad), base_dir)
  shutil.copy(os.path.join(ckpt, "adapters.pth"), bad / "adapters.pth")
  os.remove(bad / "decoder_first_last_layers.pth")
  with pytest.raises(FileNotFoundError, match="decoder_first_last_layers.pth"):
    import_official_clara(str(bad), base_dir)


def test_cli_import_gives_a_loadable_clara_model(official, tmp_path, capsys):
  """`clara-jax import-clara` writes an export that the inference API serves."""
  import io

  import sentencepiece as spm

  from clara_jax import cli
  from clara_jax.infer.api import ClaraModel

  _, ckpt, base_dir = official
  words = (
    "the river runs by the old town and the team plays in blue while a quick brown "
    "fox jumps over lazy dogs"
  ).split()
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(words, 12)) for _ in range(400)]

  def write_tokenizer(vocab_size):
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=proto,
      vocab_size=vocab_size,
      model_type="bpe",
      character_coverage=1.0,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=3,
      minloglevel=2,
    )
    with open(os.path.join(base_dir, "tokenizer.model"), "wb") as f:
      f.write(proto.getvalue())

  out = str(tmp_path / "export")
  write_tokenizer(V0 - 8)  # a tokenizer that does not belong to these weights
  assert (
    cli.main(["import-clara", f"--ckpt_dir={ckpt}", f"--hf_dir={base_dir}", f"--out={out}"]) == 2
  )
  assert "88 pieces, but the checkpoint's embedding has 96" in capsys.readouterr().err
  assert not os.path.exists(out)
  write_tokenizer(V0)
  assert (
    cli.main(
      [
        "import-clara",
        f"--ckpt_dir={ckpt}",
        f"--hf_dir={base_dir}",
        f"--out={out}",
        "--param_dtype=float32",
        "--dtype=float32",
      ]
    )
    == 0
  )
  model = ClaraModel.load(out)
  assert model.n_mem == N_MEM
  mem = model.compress_documents(["the team plays in blue", "the old town"])
  assert mem.shape == (2, N_MEM, 32) and np.isfinite(mem).all()
  answers, chosen = model.generate_from_questions(
    ["where does the team play"],
    [["the team plays in blue", "the old town"]],
    k=1,
    max_new_tokens=4,
  )
  assert len(answers) == 1 and chosen.shape == (1, 1)
