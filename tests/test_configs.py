"""Model sizes through ml_collections, as the stage configs use them."""

import importlib
import os
import sys

import pytest

from clara_jax.model.config import MODEL_SIZES, model_config
from configs.base import parse_arg, validate
from configs.common import decoder_config, model_config_dict
from configs.recipes.common import apply_overrides
from tests.python_process import run_python


@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_named_sizes_round_trip(name):
  cd = model_config_dict(name)
  assert decoder_config(cd) == model_config(name)


def test_overrides_are_validated():
  cd = model_config_dict("tiny")
  cd.lora.rank = 8
  cd.num_layers = 3
  cfg = decoder_config(cd)
  assert cfg.lora.rank == 8 and cfg.num_layers == 3
  cd.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads"):
    decoder_config(cd)


STAGE_CONFIGS = ["lm", "stage1", "stage1_2", "stage2", "stage2_retrieval"]


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_stage_configs_and_sweeps_validate(name):
  module = importlib.import_module(f"configs.{name}")
  for arg in ("model=tiny", "model=small,runlocal", "model=mistral_7b,data=/tmp/x"):
    validate(module.get_config(arg))
  points = []
  module.sweep(lambda **overrides: points.append(overrides))
  assert points
  for overrides in points:
    validate(apply_overrides(module.get_config("model=tiny"), overrides))


def test_config_errors_name_the_field():
  from configs import stage2

  c = stage2.get_config("model=tiny")
  c.clara.k = 30
  with pytest.raises(ValueError, match="clara.k = 30 exceeds data.candidates = 20"):
    validate(c)
  c = stage2.get_config("model=tiny")
  c.clara.doc_max_length = 50
  with pytest.raises(ValueError, match="multiple of compr_rate"):
    validate(c)
  c = stage2.get_config("model=tiny")
  c.train.grad_accum_steps = 3
  with pytest.raises(ValueError, match="grad_accum_steps"):
    validate(c)
  with pytest.raises(ValueError, match="unknown config variant"):
    parse_arg("modle=tiny")
  assert stage2.get_config("model=tiny").init.copy_adapters == (("compressor", "reasoner"),)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("train.log_every", 0, "train.log_every must be a positive integer, got 0"),
    ("clara.compr_rate", 0, "clara.compr_rate must be a positive integer, got 0"),
    ("clara.k", -1, "clara.k must be a positive integer, got -1"),
    ("data.candidates", 0, "data.candidates must be a positive integer"),
    ("train.num_steps", 2.5, "train.num_steps must be a positive integer, got 2.5"),
    ("train.global_batch", True, "train.global_batch must be a positive integer"),
    ("optimizer.lr", 0.0, r"optimizer.lr must be a number in \(0, inf\), got 0.0"),
    ("optimizer.lr", float("nan"), "optimizer.lr must be a number"),
    ("optimizer.warmup_ratio", 1.0, r"optimizer.warmup_ratio must be a number in \[0, 1\)"),
    ("optimizer.b2", -0.1, "optimizer.b2 must be a number"),
    ("clara.temperature", 0.0, "clara.temperature must be a number"),
    ("optimizer.schedule", "linear", "optimizer.schedule must be 'cosine' or 'constant'"),
  ],
)
def test_values_out_of_range_name_the_field(field, value, message):
  from configs import stage2

  c = stage2.get_config("model=tiny")
  *parents, leaf = field.split(".")
  node = c
  for part in parents:
    node = node[part]
  with c.ignore_type():
    node[leaf] = value
  with pytest.raises(ValueError, match=message):
    validate(c)


def test_replay_text_is_checked_where_it_is_set(tmp_path):
  from clara_jax.train import loop
  from configs import stage1, stage2

  c = stage2.get_config("model=tiny")
  c.data.replay_text = "world"
  with pytest.raises(ValueError, match="stage 'stage2' does not update it"):
    loop._with_replay_text(c, str(tmp_path / "run"), {})
  c = stage1.get_config("model=tiny")
  c.data.replay_text = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt: no such replay text file"):
    loop._with_replay_text(c, str(tmp_path / "run"), {})
  (tmp_path / "text.txt").write_text("one line\n")
  c.data.replay_text = str(tmp_path / "text.txt")
  assert loop._with_replay_text(c, "run", {"train": "t"}) == {
    "train": "t",
    "replay": str(tmp_path / "text.txt"),
  }
  c.data.replay_text = ""
  assert loop._with_replay_text(c, "run", {"train": "t"}) == {"train": "t"}


# The model fields a run recorded before the imported families' options existed.
RECORDED_MODEL_FIELDS = (
  "attention_layout",
  "base_vocab_size",
  "dtype",
  "head_dim",
  "hidden_size",
  "intermediate_size",
  "lora.adapters",
  "lora.alpha",
  "lora.dropout",
  "lora.rank",
  "num_extra_tokens",
  "num_heads",
  "num_kv_heads",
  "num_layers",
  "param_dtype",
  "remat_policy",
  "rms_norm_eps",
  "rope_theta",
  "scan_layers",
  "sliding_window",
  "tie_embeddings",
)


def test_every_model_field_added_since_is_read_as_its_old_value():
  """A tiny run recorded with only the older model fields resumes today (each newer
  field has its old value in ADDED_FIELDS, equal to today's default)."""
  from clara_jax.train import run_config

  current = run_config.flat_config(
    importlib.import_module("configs.stage1").get_config("model=tiny")
  )
  recorded = {
    k: v
    for k, v in current.items()
    if not k.startswith("model.") or k[len("model.") :] in RECORDED_MODEL_FIELDS
  }
  assert run_config.differences(recorded, current) == {}


def test_a_record_without_a_later_added_field_reads_as_its_old_value():
  """A run recorded before `clara.memory_scale` or `clara.lexical_weight` existed resumes
  under the default, and is refused under another value (naming the field)."""
  from clara_jax.train import run_config

  current = run_config.flat_config(
    importlib.import_module("configs.stage1").get_config("model=tiny")
  )
  recorded = {k: v for k, v in current.items() if k not in run_config.ADDED_FIELDS}
  assert run_config.differences(recorded, current) == {}
  changed = dict(current, **{"clara.memory_scale": "embedding"})
  assert run_config.differences(recorded, changed) == {"clara.memory_scale": ("none", "embedding")}
  changed = dict(current, **{"clara.lexical_weight": 0.5})
  assert run_config.differences(recorded, changed) == {"clara.lexical_weight": (0.0, 0.5)}


def test_a_bare_model_size_is_the_model_variant():
  from configs import stage2

  assert parse_arg("tiny") == {"model": "tiny"}
  assert parse_arg("mistral_7b,runlocal") == {"model": "mistral_7b", "runlocal": True}
  assert parse_arg("runlocal") == {"runlocal": True}
  assert stage2.get_config("small").model_size == "small"
  assert stage2.get_config("small").model == stage2.get_config("model=small").model
  with pytest.raises(ValueError, match=r"unknown config variant\(s\) \['huge'\]"):
    parse_arg("huge")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_CONFIG = """
from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config("stage2", arg)
  c.train.num_steps = 7
  return c
"""


def test_config_files_load_without_touching_sys_path(tmp_path, monkeypatch):
  """The repo's configs by a relative path from the repo root and by an absolute one
  from elsewhere, and a user's file that imports `configs.base`: sys.path stays as it
  was."""
  from clara_jax.cli.train import _config_flags

  (tmp_path / "mine.py").write_text(USER_CONFIG)
  before = list(sys.path)
  monkeypatch.chdir(ROOT)
  fv = _config_flags(["--config=configs/stage2.py:model=tiny"])
  assert (fv.config.stage, fv.config.model_size) == ("stage2", "tiny")
  monkeypatch.chdir(tmp_path)
  fv = _config_flags([f"--config={ROOT}/configs/stage2.py:tiny", "--config.train.num_steps=3"])
  assert (fv.config.model_size, fv.config.train.num_steps) == ("tiny", 3)
  fv = _config_flags(["--config=mine.py:small"])
  assert (fv.config.model_size, fv.config.train.num_steps) == ("small", 7)
  assert sys.path == before


def test_config_files_load_in_a_fresh_process(tmp_path):
  """As above in a process whose `configs` is the package beside clara_jax (found by
  PYTHONPATH here, installed by setup.py elsewhere), not yet imported, run from a
  directory that holds no `configs`."""
  (tmp_path / "mine.py").write_text(USER_CONFIG)
  code = (
    "import sys; from clara_jax.cli.train import _config_flags; before = list(sys.path); "
    f"a = _config_flags(['--config={ROOT}/configs/stage2.py:tiny']).config; "
    "b = _config_flags(['--config=mine.py:model=tiny']).config; "
    "print(a.model_size, a.train.num_steps, b.model_size, b.train.num_steps, "
    "sys.path == before)"
  )
  result = run_python("-c", code, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["tiny", "200", "tiny", "7", "True"]
