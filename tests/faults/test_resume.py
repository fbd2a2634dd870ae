"""Interrupted training ends where an uninterrupted run ends: `kill -9` at three random
points and a SIGTERM at a fourth, each followed by the same command, give parameters
bit-identical to one uninterrupted run (same data order, same rng); a SIGTERM that reaches
one host of a two-process job stops both at one step, and the resumed job matches too.

The points are drawn from a seed printed in every failure message (set
CLARA_FAULT_SEED to replay one). A kill lands wherever the run is: compiling, inside a
step, or in the middle of an asynchronous checkpoint save.
"""

import os
import random
import signal
import time

import numpy as np
import pytest
from train_cli import assert_same_params, free_port, run_train, train_args, wait_for_step

from clara_jax.train.metrics import read_metrics

STEPS = 24  # log every step, checkpoint every 2
SEED = int(os.environ.get("CLARA_FAULT_SEED", time.time_ns() % 100_000))


def _args(lm_text_file, workdir, extra=()):
  return train_args(
    lm_text_file, workdir, steps=STEPS, every=2, extra=["--config.train.log_every=1", *extra]
  )


@pytest.fixture(scope="module")
def reference(lm_text_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  log = os.path.join(workdir, "..", "uninterrupted.log")
  proc = run_train(_args(lm_text_file, workdir), log=log)
  assert proc.wait(timeout=400) == 0, open(log).read()[-3000:]
  return workdir


def _checkpoint_steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _assert_same_metrics(workdir, reference):
  rows, ref = read_metrics(workdir), read_metrics(reference)
  # Rows a killed run logged past its last checkpoint are replaced, not duplicated.
  assert [r["step"] for r in rows] == [r["step"] for r in ref]
  for row, want in zip(rows, ref):
    for key in ("loss", "ce", "grad_norm", "lr"):
      assert row[key] == want[key], (row["step"], key)


def test_three_kills_and_a_sigterm_resume_to_the_uninterrupted_run(
  lm_text_file, reference, tmp_path
):
  rng = random.Random(SEED)
  where = f"(CLARA_FAULT_SEED={SEED})"
  workdir = str(tmp_path / "run")
  # Increasing targets, so that the chain moves on; each kill or signal comes a random
  # 0-0.6 s (about one step) after its target's metrics row. The last target leaves 10
  # steps, so that no run ends before its kill.
  targets = sorted(rng.sample(range(1, STEPS - 10), 4))
  events = []
  for i, target in enumerate(targets):
    log = str(tmp_path / f"part{i}.log")
    proc = run_train(_args(lm_text_file, workdir), log=log)
    reached = wait_for_step(workdir, log, target, [proc])
    time.sleep(rng.uniform(0.0, 0.6))
    sig = signal.SIGKILL if i < 3 else signal.SIGTERM
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    events.append((sig.name, reached, code, _checkpoint_steps(workdir)))
    text = open(log).read()
    if sig == signal.SIGKILL:
      assert code == -signal.SIGKILL, (where, events, text[-3000:])
    else:
      # The step in flight finishes, its checkpoint is saved, exit 128 + 15, one line.
      assert code == 143, (where, events, text[-3000:])
      assert "clara-jax train: SIGTERM at step" in text and "Traceback" not in text
      saved = int(text.split("SIGTERM at step ")[1].split(":")[0])
      assert saved == max(_checkpoint_steps(workdir)), (where, events)
  log = str(tmp_path / "last.log")
  proc = run_train(_args(lm_text_file, workdir), log=log)
  assert proc.wait(timeout=400) == 0, (where, events, open(log).read()[-3000:])
  assert_same_params(workdir, reference)
  _assert_same_metrics(workdir, reference)


def test_sigterm_on_one_host_stops_every_host_at_one_step(lm_text_file, reference, tmp_path):
  """Two processes x 4 CPU devices (gloo): SIGTERM reaches process 1 only; JAX's
  preemption sync picks one step for both, both save it and exit 143, and the resumed
  job ends equal (to float tolerance: another device layout) to the one-process run."""
  rng = random.Random(SEED + 1)
  where = f"(CLARA_FAULT_SEED={SEED})"
  workdir = str(tmp_path / "multihost")

  def start(part):
    port, procs, logs = free_port(), [], []
    for pid in range(2):
      logs.append(str(tmp_path / f"{part}_host{pid}.log"))
      procs.append(
        run_train(
          _args(lm_text_file, workdir)
          + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"],
          devices=4,
          log=logs[-1],
          env={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"},
        )
      )
    return procs, logs

  procs, logs = start("first")
  wait_for_step(workdir, logs[0], rng.randrange(2, STEPS - 10), procs)
  time.sleep(rng.uniform(0.0, 0.6))
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=180) for p in procs]
  texts = [open(log).read() for log in logs]
  assert codes == [143, 143], (where, codes, texts[0][-2000:], texts[1][-2000:])
  stopped = [int(t.split("SIGTERM at step ")[1].split(":")[0]) for t in texts]
  assert stopped[0] == stopped[1] < STEPS, (where, stopped)
  assert max(_checkpoint_steps(workdir)) == stopped[0]
  procs, logs = start("resumed")
  codes = [p.wait(timeout=400) for p in procs]
  assert codes == [0, 0], (where, open(logs[0]).read()[-3000:], open(logs[1]).read()[-3000:])
  assert f"resumed from step {stopped[0]}" in open(logs[0]).read()
  assert_same_params(workdir, reference, atol=1e-5)
  rows, ref = read_metrics(workdir), read_metrics(reference)
  assert [r["step"] for r in rows] == [r["step"] for r in ref]
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-5)
