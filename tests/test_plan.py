"""The AOT memory plan: compiles a stage's train step for a mesh of simulated devices
and reports per-device bytes; sharding parameters shrinks their per-device share."""

import subprocess
import sys
import os

import pytest

from clara_jax.bench.plan import memory_plan
from configs import stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(mesh):
  c = stage2.get_config("model=tiny")
  c.mesh.shape = mesh
  c.clara.doc_max_length = 16
  c.clara.compr_rate = 4
  c.data.candidates = 6
  c.clara.k = 2
  c.data.prompt_length = 48
  c.data.answer_length = 8
  return c


def test_plan_reports_per_device_memory():
  replicated = memory_plan(_config((8, 1, 1)))
  sharded = memory_plan(_config((2, 2, 2)))
  for plan in (replicated, sharded):
    assert plan["total_gib_per_device"] > plan["params_gib_per_device"] > 0
    assert plan["optimizer_gib_per_device"] > 0 and plan["activations_temp_gib_per_device"] > 0
  assert sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharded["params_gib_per_device"] < replicated["params_gib_per_device"] / 2


def test_plan_cli_relaunches_with_simulated_devices():
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "clara_jax.cli", "plan",
                        f"--config={ROOT}/configs/lm.py:model=tiny", "--mesh=1,4,4",
                        "--config.data.lm_length=32"], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  import json
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan["devices"] == 16 and plan["mesh"]["tensor"] == 4
