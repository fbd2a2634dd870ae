"""Fault injection, the bad-input half: every case of `bad_input_cases.CASES` runs one
`clara-jax` command in-process on inputs built in an empty directory, and must give the
exit code and the one-line message the table states, leave every file that was there
byte-identical, and leave no new file (no temporary one either) unless it succeeded.

The table is the documentation: `docs/faults.md` is generated from it (and checked here).
"""

import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from clara_jax import cli
from tests.faults import bad_input_cases as table
from tests.random_export import tiny_random_model, write_export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Fixtures:
  """Inputs made once per module: a tiny untrained export (and copies with a NaN and with
  infinite weights) and a tiny Hugging Face Mistral checkpoint."""

  export_dir: str
  nan_export_dir: str
  inf_export_dir: str
  hf_dir: str
  hf_vocab: int
  hf_hidden: int


def _tiny_hf(out: str, vocab: int, hidden: int) -> None:
  """config.json + model.safetensors of a 1-layer Mistral, random, built from the
  importer's own tensor plan (no torch needed)."""
  from clara_jax.weights import hf_import, layout
  from clara_jax.weights import safetensors_io as st

  config = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": vocab,
    "hidden_size": hidden,
    "intermediate_size": 2 * hidden,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
  }
  os.makedirs(out)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f)
  cfg = hf_import.decoder_config_from_hf(config, 0, lora=None)
  rng = np.random.default_rng(0)
  tensors = {
    e.hf_name: rng.normal(0, 0.02, e.hf_shape).astype(np.float32)
    for e in layout.tensor_plan(cfg, tied=False)
  }
  st.write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt"})


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  root = tmp_path_factory.mktemp("fault_fixtures")
  tok, cfg, flat = tiny_random_model(np.random.default_rng(0))
  exports = {}
  for name, path, value, count in (
    ("export_dir", None, None, 0),
    ("nan_export_dir", "layers_0/mlp/up_proj/kernel", np.nan, 1),
    ("inf_export_dir", "final_norm/scale", np.inf, 2),
  ):
    params = dict(flat)
    if path:
      params[path] = params[path].copy()
      params[path].reshape(-1)[:count] = value
    exports[name] = str(root / name)
    write_export(exports[name], cfg, params, tok)
  hf_dir = str(root / "hf")
  _tiny_hf(hf_dir, vocab=64, hidden=16)
  return Fixtures(hf_dir=hf_dir, hf_vocab=64, hf_hidden=16, **exports)


# ------------------------------------------------------------------------------ running


def _snapshot(directory: str) -> dict:
  """{relative path: sha256} of every file and {relative path: None} of every directory."""
  out = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory)] = None
    for name in names:
      path = os.path.join(root, name)
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          digest.update(block)
      out[os.path.relpath(path, directory)] = digest.hexdigest()
  return out


# The child drops to an unprivileged user (root ignores file modes), then runs the CLI
# in-process. Everything is imported first: after the drop, the interpreter's own
# directories may be out of reach.
_UNPRIVILEGED_CHILD = """
import json, os, sys
from absl import flags
from clara_jax import cli
from clara_jax.data import bm25, convert
if os.getuid() == 0:
  os.setgroups([])
  os.setgid(65534)
  os.setuid(65534)
sys.exit(cli.main(json.loads(sys.argv[1])))
"""


def _run_unprivileged(argv, directory):
  if os.getuid() != 0:
    os.chmod(os.path.join(directory, "ro"), 0o555)
  else:  # the unprivileged user must reach the directory and read the inputs
    for root, _dirs, names in os.walk(directory):
      os.chmod(root, 0o555 if os.path.basename(root) == "ro" else 0o755)
      for name in names:
        os.chmod(os.path.join(root, name), 0o644)
  env = dict(os.environ, PYTHONPATH=REPO)
  try:
    done = subprocess.run(
      [sys.executable, "-c", _UNPRIVILEGED_CHILD, json.dumps(argv)],
      cwd=directory,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
  finally:
    os.chmod(os.path.join(directory, "ro"), 0o755)
  return done.returncode, done.stdout, done.stderr


def _full_disk(monkeypatch):
  """The atomic writers' low-level write writes half its bytes, then the disk is full."""
  from clara_jax import paths

  real = paths._write_all

  def write_all(fd, data):
    real(fd, data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(paths, "_write_all", write_all)


@pytest.fixture
def restore_logging():
  """`clara-jax train` sets absl's verbosity to INFO; later cases must not inherit it."""
  from absl import logging

  level = logging.get_verbosity()
  yield
  logging.set_verbosity(level)


@pytest.mark.parametrize("case", table.CASES, ids=[c.id for c in table.CASES])
def test_bad_input(case, fixtures, tmp_path, monkeypatch, capfd, restore_logging, request):
  for module in case.needs:
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"needs {module}")
  if case.runner == table.UNPRIVILEGED:
    # Its own directory under the system's: every parent must be traversable by the
    # unprivileged user (pytest's own are private to the user running the tests).
    directory = tempfile.mkdtemp(prefix="clara_faults_")
    request.addfinalizer(lambda: shutil.rmtree(directory, ignore_errors=True))
  else:
    directory = str(tmp_path / "case")
    os.makedirs(directory)
  table.write_inputs(case, directory, fixtures)
  before = _snapshot(directory)
  argv = table.argv_of(case, REPO)
  monkeypatch.chdir(directory)
  capfd.readouterr()
  if case.runner == table.UNPRIVILEGED:
    code, out, err = _run_unprivileged(argv, directory)
  else:
    if case.runner == table.FULL_DISK:
      _full_disk(monkeypatch)
    code = cli.main(argv)
    out, err = capfd.readouterr()

  lines = err.splitlines()
  assert "Traceback" not in err, err
  assert code == case.code, f"exit {code}, expected {case.code}; stderr: {err}"
  if case.code == 0:  # counted skips: the skip lines, nothing else
    assert lines and all(line.startswith("skipped: ") for line in lines), err
  else:
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    prefix = f"clara-jax {case.command}: " + ("failed: " if case.code == 1 else "")
    assert lines[0].startswith(prefix), err
    if case.code == 1:
      assert lines[0].endswith("(run again with --debug for the traceback)"), err
    else:
      assert "failed:" not in lines[0], err
  for fragment in case.expect:
    assert fragment in err, f"{fragment!r} not in stderr: {err}"
  for fragment in case.stdout:
    assert fragment in out, f"{fragment!r} not in stdout: {out}"

  after = _snapshot(directory)
  changed = sorted(p for p in before if after.get(p, "gone") != before[p])
  assert not changed, f"files changed or removed: {changed}"
  new = sorted(set(after) - set(before))
  assert new == sorted(case.creates), f"new files: {new}, expected {list(case.creates)}"


def test_table_is_well_formed():
  ids = [c.id for c in table.CASES]
  assert len(ids) == len(set(ids)), "case ids must be unique"
  assert len(table.CASES) >= 38
  commands = {c.command for c in table.CASES}
  assert {
    "convert",
    "evaluate",
    "lens",
    "index",
    "synth",
    "train",
    "import-hf",
    "import-clara",
    "info",
    "bench",
  } <= commands
  for case in table.CASES:
    assert case.code in (0, 1, 2) and case.expect and case.tried, case.id
    assert case.runner in (table.IN_PROCESS, table.UNPRIVILEGED, table.FULL_DISK), case.id


def test_docs_table_is_current():
  path = os.path.join(REPO, "docs", "faults.md")
  with open(path, encoding="utf-8") as f:
    written = f.read()
  assert written == table.markdown(), (
    f"docs/faults.md is out of date with tests/faults/bad_input_cases.py; regenerate it "
    f"from the repository root with: {table.REGENERATE}"
  )
