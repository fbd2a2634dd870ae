"""The training job from the CLI: loss goes down, metrics and exports are written, runs
save on SIGINT, fall back over a corrupt checkpoint, refuse a changed config or a second
writer, and stop after repeated non-finite updates. (Kills, preemption and a two-process
job, each resumed to the one-process uninterrupted run: tests/faults/test_resume.py.)"""

import os
import signal
import time

import numpy as np
import pytest
from train_cli import assert_same_params, final_params, run_train, train_args

from clara_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def reference_run(lm_text_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  proc = run_train(train_args(lm_text_file, workdir, steps=12, every=2))
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out.decode()[-3000:]
  return workdir


def test_lm_stage_trains_and_reports(reference_run):
  rows = read_metrics(reference_run)
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
  for key in ("ce", "lr", "grad_norm", "tokens_per_s", "mfu", "steps_per_s"):
    assert key in rows[-1]
  assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["nonfinite"] == 0
  assert os.listdir(os.path.join(reference_run, "tensorboard"))
  assert os.path.exists(os.path.join(reference_run, "export", "tokenizer.model"))


@pytest.mark.parametrize("signum", [signal.SIGINT])  # SIGTERM: tests/faults/test_resume.py
def test_a_signal_saves_a_checkpoint_and_exits_with_its_code(lm_text_file, tmp_path, signum):
  workdir = str(tmp_path / "preempted")
  proc = run_train(train_args(lm_text_file, workdir, steps=400, every=100))
  deadline = time.time() + 240
  ckpt = os.path.join(workdir, "checkpoints")
  while time.time() < deadline and proc.poll() is None:
    if read_metrics(workdir) or os.path.exists(os.path.join(workdir, "export", "x")):
      break
    time.sleep(0.05)
  # Wait until the loop runs (the first log is at step 100; any step past 0 will do).
  time.sleep(3.0)
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=120)
  text = out.decode()
  # 128 + the signal, one line naming it and how to resume; no traceback.
  assert proc.returncode == 128 + signum, text[-3000:]
  assert "preempted at step" in text and "Traceback" not in text
  # TensorFlow (clu's metric writer) starts quietly: no oneDNN or CPU-feature notices.
  assert "oneDNN" not in text and "cpu_feature_guard" not in text
  assert f"clara-jax train: {signal.Signals(signum).name} at step" in text
  assert "run the same command again to resume" in text
  steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()]
  assert steps and 0 < max(steps) < 400
  assert not os.path.exists(os.path.join(workdir, "LOCK.json"))  # released on the way out


def test_a_second_writer_is_refused(lm_text_file, tmp_path):
  from clara_jax import cli
  from clara_jax.train.workdir_lock import WorkdirLock

  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  with WorkdirLock(workdir):
    before = sorted(os.listdir(workdir))
    assert cli.main(train_args(lm_text_file, workdir)) == 2
    assert sorted(os.listdir(workdir)) == before  # nothing written beside the holder


def test_corrupt_newest_checkpoint_falls_back(reference_run, lm_text_file, tmp_path, caplog):
  import shutil

  import jax

  from clara_jax.train.checkpoint import Checkpointer

  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_run, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ckpt.all_steps()
  assert steps[-1] == 12 and len(steps) == 3
  # Truncate every data file of the newest checkpoint's state.
  newest = os.path.join(workdir, "checkpoints", "12", "state")
  for dirpath, _, files in os.walk(newest):
    for name in files:
      with open(os.path.join(dirpath, name), "r+b") as f:
        f.truncate(0)
  # Restore with the structure of a saved state (read from the previous good one).
  meta = ckpt.manager.item_metadata(steps[-2])["state"]
  abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
  with caplog.at_level("WARNING"):
    step, state, data = ckpt.restore(abstract)
  assert step == steps[-2]
  assert data["next_index"] > 0
  assert any("unreadable" in r.message for r in caplog.records)
  # The unreadable step is kept aside, not deleted, and no longer listed.
  assert ckpt.all_steps() == steps[:-1]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "12.unreadable"))
  ckpt.close()
  # The CLI resumes from the good step and writes step 12 anew.
  proc = run_train(train_args(lm_text_file, workdir, steps=12, every=2))
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out.decode()[-3000:]
  assert f"resumed from step {steps[-2]}" in out.decode()
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()[-1] == 12


def _tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_a_changed_config_is_refused_and_the_run_left_intact(lm_text_file, reference_run, tmp_path):
  import shutil

  workdir = str(tmp_path / "changed")
  shutil.copytree(reference_run, workdir)
  before = _tree_bytes(workdir)
  proc = run_train(
    train_args(
      lm_text_file,
      workdir,
      steps=12,
      every=2,
      extra=["--config.optimizer.lr=0.01", "--config.model.num_layers=3"],
    )
  )
  out, _ = proc.communicate(timeout=300)
  text = out.decode()
  assert proc.returncode == 2, text[-3000:]
  assert "optimizer.lr: 0.003 -> 0.01" in text and "model.num_layers: 2 -> 3" in text
  assert "Traceback" not in text
  assert f"--config.init.from_checkpoint={workdir}" in text
  assert _tree_bytes(workdir) == before
  # Logging and saving may change on a resume.
  proc = run_train(train_args(lm_text_file, workdir, steps=12, every=3))
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out.decode()[-3000:]
  # The opt-in: a new workdir starts the changed model from the overlapping parameters
  # (2 layers of 3, embeddings, head), leaving the old run as it was.
  after = _tree_bytes(workdir)
  grown = str(tmp_path / "grown")
  proc = run_train(
    train_args(
      lm_text_file,
      grown,
      steps=4,
      every=2,
      extra=["--config.model.num_layers=3", f"--config.init.from_checkpoint={workdir}"],
    )
  )
  out, _ = proc.communicate(timeout=300)
  text = out.decode()
  assert proc.returncode == 0, text[-3000:]
  layer = sum(1 for k in final_params(reference_run) if k.startswith("layers_0/"))
  total = len(final_params(grown))
  assert f"init.from_checkpoint: {total - layer} of {total} parameters from {workdir}" in text, (
    text[-3000:]
  )
  assert f"kept from the init: {layer} the checkpoint lacks, 0 of another shape" in text
  assert _tree_bytes(workdir) == after


def test_overlay_takes_what_matches_in_path_and_shape(reference_run):
  import jax.numpy as jnp

  from clara_jax.train.checkpoint import newest_parameters
  from clara_jax.train.loop import overlay_parameters

  path, saved = newest_parameters(reference_run)
  assert path.endswith(os.path.join("checkpoints", "12", "state"))
  final = final_params(reference_run)  # the export is the last checkpoint's parameters
  assert set(saved) == set(final)
  for key in final:
    np.testing.assert_array_equal(saved[key], final[key], err_msg=key)
  params = {
    "a": {"w": jnp.zeros((2, 3), jnp.bfloat16)},
    "b": {"w": jnp.zeros((4,))},
    "c": {"w": jnp.zeros((1,))},
  }
  got = overlay_parameters(
    params, "src", {"a/w": np.ones((2, 3), np.float32), "b/w": np.ones((5,)), "d/w": np.ones(1)}
  )
  assert got["a"]["w"].dtype == jnp.bfloat16 and float(got["a"]["w"].sum()) == 6
  assert float(got["b"]["w"].sum()) == 0 and float(got["c"]["w"].sum()) == 0
  with pytest.raises(ValueError, match="no parameter of src matches"):
    overlay_parameters(params, "src", {"x/w": np.ones(1)})


def test_repeated_nonfinite_updates_stop_the_run(lm_text_file, tmp_path):
  workdir = str(tmp_path / "nan")
  proc = run_train(
    train_args(
      lm_text_file,
      workdir,
      steps=30,
      every=2,
      extra=[
        "--config.optimizer.lr=1e30",
        "--config.optimizer.warmup_ratio=0",
        "--config.train.max_consecutive_nonfinite=3",
      ],
    )
  )
  out, _ = proc.communicate(timeout=300)
  text = out.decode()
  assert proc.returncode != 0
  assert "consecutive steps had a non-finite loss" in text
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))


def test_resume_onto_a_different_mesh(lm_text_file, reference_run, tmp_path):
  import shutil

  workdir = str(tmp_path / "remesh")
  shutil.copytree(reference_run, workdir)
  proc = run_train(
    train_args(lm_text_file, workdir, steps=16, every=2, extra=["--config.mesh.shape=(1,2,4)"])
  )
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out.decode()[-3000:]
  assert "resumed from step 12" in out.decode()
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows][-2:] == [14, 16]
  assert np.isfinite(rows[-1]["loss"]) and rows[-1]["loss"] < rows[0]["loss"]


def test_batch_must_divide_the_data_parallel_size(lm_text_file, tmp_path, capsys):
  from clara_jax import cli

  argv = train_args(lm_text_file, str(tmp_path / "w"), extra=["--config.train.global_batch=12"])
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("clara-jax train: config: train.global_batch / grad_accum_steps")
  assert "not divisible by the data-parallel size 8" in err and len(err.splitlines()) == 1
  with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
    cli.main(argv + ["--debug"])


def test_checkpoints_only_on_the_interval_or_forced(tmp_path):
  import jax.numpy as jnp

  from clara_jax.train.checkpoint import Checkpointer

  ckpt = Checkpointer(str(tmp_path / "c"), save_every=2, keep=5)
  saved = [ckpt.save(step, {"w": jnp.full((2,), step)}, {"pos": step}) for step in range(1, 6)]
  saved.append(ckpt.save(5, {"w": jnp.zeros((2,))}, {"pos": 5}, force=True))
  ckpt.close()
  # No save at step 1: a resume must land on a logging boundary.
  assert saved == [False, True, False, True, False, True]
  assert ckpt.all_steps() == [2, 4, 5]


def test_scanned_blocks_train_as_the_unrolled_ones(lm_text_file, reference_run, tmp_path):
  """Both continue the reference run's export for 4 steps; the scanned run's export
  (written unrolled) holds the same parameters."""
  runs = {}
  for name, scan in (("unrolled", False), ("scanned", True)):
    workdir = str(tmp_path / name)
    proc = run_train(
      train_args(
        lm_text_file,
        workdir,
        steps=4,
        every=2,
        extra=[f"--config.init.from_workdir={reference_run}", f"--config.model.scan_layers={scan}"],
      )
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    runs[name] = workdir
  assert_same_params(runs["scanned"], runs["unrolled"], atol=2e-5)
  rows = {name: read_metrics(w) for name, w in runs.items()}
  np.testing.assert_allclose(
    [r["loss"] for r in rows["scanned"]], [r["loss"] for r in rows["unrolled"]], rtol=1e-5
  )


def test_restore_refuses_checkpoints_that_do_not_restore_and_resumes_otherwise(monkeypatch):
  """`_restore`: saved steps none of which restores stop the run (naming the directory,
  the checkpointer closed); a restored checkpoint gives its step, state and data
  position; nothing saved is a first start."""
  from clara_jax.train import loop

  class FakeCheckpointer:
    directory = "/runs/x/checkpoints"

    def __init__(self, restored):
      self.restored, self.closed = restored, False

    def restore(self, abstract):
      return self.restored

    def close(self):
      self.closed = True

  class FakePipeline:
    state = None

    def set_state(self, state):
      self.state = state

  monkeypatch.setattr(loop, "abstract_with_shardings", lambda abstract, shardings: abstract)
  state = {"w": np.zeros(2, np.float32)}
  broken = FakeCheckpointer(None)
  with pytest.raises(RuntimeError, match=r"/runs/x/checkpoints: checkpoints of steps \[5\]"):
    loop._restore(broken, state, None, FakePipeline(), [5])
  assert broken.closed
  pipeline = FakePipeline()
  assert loop._restore(
    FakeCheckpointer((7, "restored", {"pos": 3})), state, None, pipeline, [7]
  ) == (
    7,
    "restored",
  )
  assert pipeline.state == {"pos": 3}
  assert loop._restore(FakeCheckpointer(None), state, None, FakePipeline(), []) == (0, state)
