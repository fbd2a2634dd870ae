"""The training job from the CLI: loss goes down, metrics and exports are written, runs
resume exactly after SIGKILL, save on SIGTERM, fall back over a corrupt checkpoint, and
stop after repeated non-finite updates."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clara_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("alpha beta gamma delta river stone city team blue red north west coach mayor "
         "founded played born year club valley").split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  rng = random.Random(0)
  path = tmp_path_factory.mktemp("lm") / "lm.txt"
  path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(20))
                            for _ in range(300)))
  return str(path)


def _args(text_file, workdir, steps=12, every=4, extra=()):
  return ["train", "--config=" + os.path.join(ROOT, "configs", "lm.py") + ":model=tiny",
          f"--workdir={workdir}", f"--config.data.source={text_file}",
          "--config.tokenizer.vocab_size=300", "--config.data.lm_length=32",
          f"--config.train.num_steps={steps}", f"--config.train.log_every={every}",
          f"--config.train.checkpoint_every={every}", "--config.train.peak_flops=1e11",
          *extra]


def _run(args, **kw):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.Popen([sys.executable, "-m", "clara_jax.cli", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _final_params(workdir):
  from clara_jax.weights.export import load_params
  from clara_jax.model import lora
  _, params = load_params(os.path.join(workdir, "export"))
  return lora.flatten(params)


@pytest.fixture(scope="module")
def reference_run(text_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  proc = _run(_args(text_file, workdir, steps=12, every=2))
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


def _finished_checkpoints(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []


def test_resume_after_sigkill_is_bit_identical(text_file, reference_run, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = _run(_args(text_file, workdir, steps=12, every=2))
  kill_after = random.Random(int(time.time())).choice([4, 6, 8])
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    rows = read_metrics(workdir)
    # Kill only once a checkpoint is finalised (orbax renames a finished step directory
    # to its number): a kill before that has nothing to resume from.
    if rows and rows[-1]["step"] >= kill_after and _finished_checkpoints(workdir):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  resumed = _run(_args(text_file, workdir, steps=12, every=2))
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out.decode()[-3000:]
  assert "resumed from step" in out.decode()
  want, got = _final_params(reference_run), _final_params(workdir)
  assert set(want) == set(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  ref_rows, rows = read_metrics(reference_run), read_metrics(workdir)
  # Rows the killed run logged past its last checkpoint are replaced, not duplicated.
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
  for row, ref in zip(rows, ref_rows):
    for key in ("loss", "ce", "grad_norm", "lr"):
      assert row[key] == ref[key], (row["step"], key)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_with_its_code(text_file, tmp_path, signum):
  workdir = str(tmp_path / "preempted")
  proc = _run(_args(text_file, workdir, steps=400, every=100))
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
  assert f"clara-jax train: {signal.Signals(signum).name} at step" in text
  assert "run the same command again to resume" in text
  steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()]
  assert steps and 0 < max(steps) < 400
  assert not os.path.exists(os.path.join(workdir, "LOCK.json"))  # released on the way out


def test_a_second_writer_is_refused(text_file, tmp_path):
  from clara_jax import cli
  from clara_jax.train.workdir_lock import WorkdirLock
  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  with WorkdirLock(workdir):
    before = sorted(os.listdir(workdir))
    assert cli.main(_args(text_file, workdir)) == 2
    assert sorted(os.listdir(workdir)) == before  # nothing written beside the holder


def test_corrupt_newest_checkpoint_falls_back(reference_run, text_file, tmp_path, caplog):
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
  proc = _run(_args(text_file, workdir, steps=12, every=2))
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


def test_a_changed_config_is_refused_and_the_run_left_intact(text_file, reference_run,
                                                             tmp_path):
  import shutil
  workdir = str(tmp_path / "changed")
  shutil.copytree(reference_run, workdir)
  before = _tree_bytes(workdir)
  proc = _run(_args(text_file, workdir, steps=12, every=2,
                    extra=["--config.optimizer.lr=0.01", "--config.model.num_layers=3"]))
  out, _ = proc.communicate(timeout=300)
  text = out.decode()
  assert proc.returncode == 2, text[-3000:]
  assert "optimizer.lr: 0.003 -> 0.01" in text and "model.num_layers: 2 -> 3" in text
  assert "Traceback" not in text
  assert _tree_bytes(workdir) == before
  # Logging and saving may change on a resume.
  proc = _run(_args(text_file, workdir, steps=12, every=3))
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out.decode()[-3000:]


def test_repeated_nonfinite_updates_stop_the_run(text_file, tmp_path):
  workdir = str(tmp_path / "nan")
  proc = _run(_args(text_file, workdir, steps=30, every=2,
                    extra=["--config.optimizer.lr=1e30", "--config.optimizer.warmup_ratio=0",
                           "--config.train.max_consecutive_nonfinite=3"]))
  out, _ = proc.communicate(timeout=300)
  text = out.decode()
  assert proc.returncode != 0
  assert "consecutive steps had a non-finite loss" in text
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(text_file, reference_run, tmp_path):
  """2 processes x 4 CPU devices (gloo collectives) reproduce 1 process x 8 devices."""
  workdir = str(tmp_path / "multihost")
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  procs = []
  for pid in range(2):
    args = _args(text_file, workdir, steps=12, every=2) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={pid}"]
    procs.append(subprocess.Popen([sys.executable, "-m", "clara_jax.cli", *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=400)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  rows, ref = read_metrics(workdir), read_metrics(reference_run)
  assert [r["step"] for r in rows] == [r["step"] for r in ref]  # process 0 alone logs
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-5)
  want, got = _final_params(reference_run), _final_params(workdir)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)


def test_resume_onto_a_different_mesh(text_file, reference_run, tmp_path):
  import shutil
  workdir = str(tmp_path / "remesh")
  shutil.copytree(reference_run, workdir)
  proc = _run(_args(text_file, workdir, steps=16, every=2,
                    extra=["--config.mesh.shape=(1,2,4)"]))
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out.decode()[-3000:]
  assert "resumed from step 12" in out.decode()
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows][-2:] == [14, 16]
  assert np.isfinite(rows[-1]["loss"]) and rows[-1]["loss"] < rows[0]["loss"]


def test_batch_must_divide_the_data_parallel_size(text_file, tmp_path, capsys):
  from clara_jax import cli
  argv = _args(text_file, str(tmp_path / "w"), extra=["--config.train.global_batch=12"])
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
