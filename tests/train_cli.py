"""Helpers for tests that run `clara-jax train` in subprocesses on a small text file."""

import os
import random
import re
import socket
import subprocess
import sys
import time

import numpy as np

from clara_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
  "alpha beta gamma delta river stone city team blue red north west coach mayor "
  "founded played born year club valley"
).split()


def write_text_file(path) -> str:
  """300 lines of 20 seeded words: the lm stage's training text."""
  rng = random.Random(0)
  with open(path, "w") as f:
    f.write("\n".join(" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(300)))
  return str(path)


def train_args(text_file, workdir, steps=12, every=4, extra=()):
  """`clara-jax train` of the tiny lm stage: log and checkpoint every `every` steps."""
  return [
    "train",
    "--config=" + os.path.join(ROOT, "configs", "lm.py") + ":model=tiny",
    f"--workdir={workdir}",
    f"--config.data.source={text_file}",
    "--config.tokenizer.vocab_size=300",
    "--config.data.lm_length=32",
    f"--config.train.num_steps={steps}",
    f"--config.train.log_every={every}",
    f"--config.train.checkpoint_every={every}",
    "--config.train.peak_flops=1e11",
    *extra,
  ]


def run_train(args, devices=8, log=None, env=None):
  """Starts `python -m clara_jax.cli ARGS` on `devices` CPU devices. Output goes to the
  file `log` when given (a pipe nobody reads would stall a long run), else to a pipe."""
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    **(env or {}),
  )
  out = open(log, "w") if log else subprocess.PIPE
  try:
    return subprocess.Popen(
      [sys.executable, "-m", "clara_jax.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
    )
  finally:
    if log:
      out.close()


def final_params(workdir):
  from clara_jax.model import layout, lora
  from clara_jax.weights.export import load_params

  _, params = load_params(os.path.join(workdir, "export"))
  return lora.flatten(layout.to_unrolled(params))


def assert_same_params(workdir, reference, atol=None):
  want, got = final_params(reference), final_params(workdir)
  assert set(want) == set(got)
  for key in want:
    if atol is None:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    else:
      np.testing.assert_allclose(got[key], want[key], atol=atol, err_msg=key)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for_step(workdir, log, step, procs, timeout=300.0) -> int:
  """Waits until the run logging to `log` has started its loop (its "training steps A to
  B" line) and logged a metrics row at `step` or later (or at its first step, A, if that
  is later); returns that row's step. Rows a killed run left behind do not count: they are
  dropped before the line is logged. Fails if any of `procs` exits first."""
  deadline = time.time() + timeout
  first = None
  while time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"the run ended before step {step}:\n" + _tail(log))
    if first is None:
      match = re.search(r"training steps (\d+) to", _tail(log, 200_000))
      first = int(match.group(1)) if match else None
    rows = read_metrics(workdir) if first is not None else []
    if rows and rows[-1]["step"] >= max(step, first):
      return rows[-1]["step"]
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached in {timeout:.0f} s:\n" + _tail(log))


def _tail(path, n=3000) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()[-n:]
  except FileNotFoundError:
    return ""
