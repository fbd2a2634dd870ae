"""The AOT plan: compiles a stage's train step for a mesh of simulated CPU devices or a
TPU slice (the TPU compiler, from libtpu) and reports per-device bytes, the compiler's
cost analysis and, for a TPU slice, a roofline estimate."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from clara_jax.bench import plan as plan_lib
from clara_jax.bench import tpu
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
    assert plan["optimizer_gib_per_device"] > 0 and plan["temp_gib_per_device"] > 0
    assert plan["compiler"] == "cpu" and plan["xla_flops_per_device"] > 0
  assert sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharded["params_gib_per_device"] < replicated["params_gib_per_device"] / 2


def test_plan_cli_relaunches_with_simulated_devices():
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "clara_jax.cli",
      "plan",
      f"--config={ROOT}/configs/lm.py:model=tiny",
      "--mesh=1,4,4",
      "--config.data.lm_length=32",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan["devices"] == 16 and plan["mesh"]["tensor"] == 4


def test_tpu_slice_names():
  v5e = tpu.parse_slice("v5e-256")
  assert (v5e.chips, v5e.topology_name) == (256, "v5e:16x16")
  v5p = tpu.parse_slice("v5p-128")  # v5p names count TensorCores: 64 chips
  assert (v5p.chips, v5p.topology_name) == (64, "v5p:4x4x4")
  assert tpu.parse_slice("v4-64").topology_name == "v4:4x4x2"
  assert tpu.parse_slice("v6e-8").topology_name == "v6e:2x4"
  for bad, message in [
    ("v7-8", "GENERATION in"),
    ("v5e-12", "power-of-two"),
    ("v5p-3", "TensorCores, 2 per chip"),
  ]:
    with pytest.raises(ValueError, match=message):
      tpu.parse_slice(bad)


def test_mesh_shapes_cover_the_factorisations():
  shapes = set(plan_lib.mesh_shapes(8))
  assert len(shapes) == 10 and all(d * f * t == 8 for d, f, t in shapes)
  assert (1, 8, 1) in shapes and (2, 2, 2) in shapes


LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(
  not LIBTPU,
  reason="libtpu is not installed (pip install "
  "'clara_jax[tpu]'); the TPU compiler is what this test runs",
)
def test_stage2_compiles_for_a_tpu_slice():
  c = _config((1, 4, 2))
  c.train.global_batch = 4
  plan = memory_plan(c, topology="v5e-8")
  assert plan["compiler"] == "tpu" and plan["devices"] == 8 and plan["chip"] == "v5e"
  assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert plan["fits"] and plan["hbm_gib_per_device"] == 16
  assert plan["total_gib_per_device"] >= plan["argument_gib_per_device"] > 0
  assert plan["xla_flops_per_device"] > 0 and plan["xla_bytes_per_device"] > 0
  assert plan["roofline_step_s"] == max(plan["roofline_compute_s"], plan["roofline_memory_s"]) > 0
  assert 0 < plan["roofline_mfu"] <= 1


def test_search_keeps_what_fits_best_first(monkeypatch):
  tried = []

  def fake_plan(config, topology):
    shape = tuple(config.mesh.shape)
    tried.append((shape, config.train.grad_accum_steps, config.model.remat_policy))
    return {
      "fits": shape[2] == 1,
      "roofline_mfu": 0.1 * shape[0] + 0.01 * shape[1],
      "total_gib_per_device": 1.0,
      "hbm_gib_per_device": 16.0,
    }

  monkeypatch.setattr(plan_lib, "memory_plan", fake_plan)
  monkeypatch.setattr(tpu, "topology_devices", lambda slice_: [None] * 4)
  c = _config((1, 1, 1))
  c.train.global_batch = 4
  fits = plan_lib.search(
    c, "v5e-4", remat_policies=("none",), accum_steps=(1, 2), log=lambda line: None
  )
  # accum 2 leaves micro-batches of 2: only meshes with data * fsdp <= 2 take it
  assert ((4, 1, 1), 2, "none") not in tried and ((2, 1, 2), 2, "none") in tried
  assert [p["roofline_mfu"] for p in fits] == sorted(
    (p["roofline_mfu"] for p in fits), reverse=True
  )
  # Only tensor = 1 fits here, and with it data * fsdp = 4 takes no micro-batch of 2.
  assert len(fits) == 3


def test_step_cost_of_a_scanned_model_is_the_unrolled_cost():
  """XLA counts a loop body once; the plan's cost extrapolates unrolled depths 1 and 2."""
  import jax

  c = _config((1, 1, 1))
  c.train.global_batch = 2
  c.data.candidates = 2  # one compression chunk: no loop left in the unrolled program
  c.model.num_layers = 3
  devices = jax.devices()[:1]
  unrolled = plan_lib._cost(plan_lib._compile(c, devices)[3])
  c.model.scan_layers = True
  scanned_direct = plan_lib._cost(plan_lib._compile(c, devices)[3])
  assert scanned_direct["flops"] < 0.6 * unrolled["flops"]  # what the probes correct
  got = plan_lib.step_cost(c, devices)
  assert abs(got["flops"] / unrolled["flops"] - 1) < 0.02
  assert abs(got["bytes"] / unrolled["bytes"] - 1) < 0.15


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed (the TPU topology's devices)")
def test_tpu_meshes_follow_the_physical_torus():
  """On a TPU slice the mesh takes mesh_utils' topology-aware order (it differs from the
  plain order for a 4x4 torus laid out as fsdp 4 x tensor 4); CPU devices keep theirs."""
  import jax
  import numpy as np
  from jax.experimental import mesh_utils

  from clara_jax import partitioning
  from clara_jax.bench import tpu

  devices = tpu.topology_devices(tpu.parse_slice("v5e-16"))
  mesh = partitioning.make_mesh((1, 4, 4), devices)
  np.testing.assert_array_equal(mesh.devices, mesh_utils.create_device_mesh((1, 4, 4), devices))
  assert (mesh.devices != np.asarray(devices).reshape(1, 4, 4)).any()
  cpu = partitioning.make_mesh((2, 2, 2))
  assert [d.id for d in cpu.devices.reshape(-1)] == [d.id for d in jax.devices()]
