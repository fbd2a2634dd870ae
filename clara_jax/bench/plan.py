"""Memory and speed plan before paying for a pod: compile a stage's real train step ahead
of time and read the compiler's memory and cost analyses.

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs
with the run's shardings, and the step goes through `train.setup.setup_train_step`, the
same set-up `train` runs (maxtext's train_compile idea). Two targets:

* a TPU slice (`topology="v5e-256"`): the TPU compiler (libtpu, the `tpu` extra) builds
  the program for that slice's devices on this host; figures are what the TPU compiler
  allocates, and a roofline from the chip's public specs bounds the step time.
* simulated CPU devices (no topology): XLA:CPU's figures for the same partitioned
  program, a fallback where libtpu is absent (labelled `"compiler": "cpu"`); the host
  must expose the mesh's device count (`--xla_force_host_platform_device_count`).

Per-device figures; letters as in `clara_jax.model.flops`.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clara_jax.bench import tpu
from clara_jax.model.config import REMAT_POLICIES
from clara_jax.model.decoder import abstract_params
from clara_jax.train.setup import abstract_batch, setup_train_step, stage_decoder_config, step_flops

if TYPE_CHECKING:
  import ml_collections

  from clara_jax.train.setup import TrainStepSetup

GIB = 1024**3


def _per_device_bytes(tree: Any, shardings: Any) -> float:
  total = 0.0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    shard_shape = sharding.shard_shape(leaf.shape)
    total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _cost(compiled: Any) -> Dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def lower_step(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device]
) -> Tuple[TrainStepSetup, Any, Any, Any]:
  """(setup, abstract state, its shardings, the step lowered for abstract inputs)."""
  cfg = stage_decoder_config(config)
  abstract = nn.meta.unbox(abstract_params(cfg))
  setup = setup_train_step(config, cfg, abstract, devices=devices)
  state_shape = setup.abstract_state(abstract)
  state_sh = setup.state_shardings(state_shape)
  batch = abstract_batch(config, setup.cclara.n_mem)
  return setup, state_shape, state_sh, setup.lower(state_shape, state_sh, batch)


def _compile(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device]
) -> Tuple[TrainStepSetup, Any, Any, Any, float]:
  """(setup, abstract state, its shardings, compiled step, compile seconds)."""
  setup, state_shape, state_sh, lowered = lower_step(config, devices)
  start = time.perf_counter()
  compiled = lowered.compile()
  return setup, state_shape, state_sh, compiled, time.perf_counter() - start


def step_cost(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> Dict[str, float]:
  """The compiler's FLOPs and bytes accessed per device for the whole depth.

  XLA's cost analysis counts a loop body once, so a scanned decoder reads as one layer.
  The cost is therefore taken from unrolled compiles of depth 1 and 2 (quick at any
  width) and extrapolated linearly to the model's depth. In them stage2 compresses all
  candidates in one chunk and gradient accumulation becomes one full-batch step (the
  same FLOPs; the weights read once instead of once per chunk or micro-batch, so the
  bytes are a lower bound)."""
  layers = config.model.num_layers
  loops = (
    config.model.scan_layers
    or config.train.grad_accum_steps > 1
    or (config.stage.startswith("stage2") and config.data.candidates > config.clara.compress_chunk)
  )
  if layers <= 2 and not loops:
    return _cost(_compile(config, devices)[3])
  costs = []
  for depth in (1, 2):
    probe = config.copy_and_resolve_references()
    probe.model.num_layers = depth
    probe.model.scan_layers = False
    probe.train.grad_accum_steps = 1  # the micro-batch loop would count once, too
    probe.clara.compress_chunk = max(probe.data.candidates, 1)  # and the chunk loop
    costs.append(_cost(_compile(probe, devices)[3]))
  return {key: costs[0][key] + (layers - 1) * (costs[1][key] - costs[0][key]) for key in costs[0]}


def memory_plan(config: ml_collections.ConfigDict, topology: Optional[str] = None) -> Dict:
  """Compiles the stage's train step for `config.mesh.shape` over the TPU slice
  `topology`'s devices, or over the visible devices when None; returns per-device
  bytes, the compiler's cost analysis and, on a TPU slice, a roofline estimate."""
  slice_ = tpu.parse_slice(topology) if topology else None
  devices = tpu.topology_devices(slice_) if slice_ else jax.devices()
  setup, state_shape, state_sh, compiled, compile_s = _compile(config, devices)
  cfg = setup.cfg
  analysis = compiled.memory_analysis()
  params_b = _per_device_bytes(state_shape.trainable, state_sh.trainable) + _per_device_bytes(
    state_shape.frozen, state_sh.frozen
  )
  opt_b = _per_device_bytes(state_shape.opt_state, state_sh.opt_state)
  temp = float(analysis.temp_size_in_bytes)
  args = float(analysis.argument_size_in_bytes)
  out = float(analysis.output_size_in_bytes) - float(analysis.alias_size_in_bytes)
  code = float(analysis.generated_code_size_in_bytes)
  total = args + temp + max(out, 0.0) + code
  n = len(devices)
  cost = step_cost(config, devices) if slice_ else _cost(compiled)
  model_flops = step_flops(config, cfg, setup.cclara)
  plan = {
    "stage": config.stage,
    "model": config.model_size,
    "compiler": "tpu" if slice_ else "cpu",
    "topology": slice_.name if slice_ else None,
    "devices": n,
    "mesh": dict(setup.mesh.shape),
    "global_batch": config.train.global_batch,
    "grad_accum_steps": config.train.grad_accum_steps,
    "remat_policy": cfg.remat_policy,
    "scan_layers": cfg.scan_layers,
    "num_params": cfg.num_params(),
    "compile_s": round(compile_s, 1),
    "params_gib_per_device": params_b / GIB,
    "optimizer_gib_per_device": opt_b / GIB,
    "batch_gib_per_device": (args - params_b - opt_b) / GIB,
    "argument_gib_per_device": args / GIB,
    "output_gib_per_device": max(out, 0.0) / GIB,
    "temp_gib_per_device": temp / GIB,
    "generated_code_gib_per_device": code / GIB,
    "total_gib_per_device": total / GIB,
    "xla_flops_per_device": cost["flops"],
    "xla_bytes_per_device": cost["bytes"],
    "model_flops_per_device": model_flops / n,
  }
  if slice_:
    plan.update(roofline(slice_, n, cost, model_flops / n, total))
  return plan


def roofline(
  slice_: tpu.TpuSlice,
  devices: int,
  cost: Dict[str, float],
  model_flops_per_device: float,
  total_bytes: float,
) -> Dict:
  """Lower bound of the step time from the chip's peak FLOP/s and HBM bandwidth, and
  the MFU that bound implies for the step's model FLOPs (an upper bound on the MFU).

  The compute term takes the larger of the compiler's FLOPs and the model's; the memory
  term reads the compiler's bytes accessed. Both compiler counts are lower bounds: XLA
  counts a loop body once, and on large meshes the TPU partitioner turns all-gathers
  into looped (windowed) matmuls, whose bodies are counted once too. Collectives and
  other overheads are not in the bound."""
  share = slice_.chips / devices  # chips per device: 1, or 1/2 for v4's two cores
  peak = slice_.chip.bf16_flops * share
  bandwidth = slice_.chip.hbm_bandwidth * share
  hbm = slice_.chip.hbm_bytes * share
  compute_s = max(cost["flops"], model_flops_per_device) / peak
  memory_s = cost["bytes"] / bandwidth
  step_s = max(compute_s, memory_s)
  return {
    "chip": slice_.chip.name,
    "hbm_gib_per_device": hbm / GIB,
    "fits": total_bytes <= hbm,
    "roofline_compute_s": compute_s,
    "roofline_memory_s": memory_s,
    "roofline_step_s": step_s,
    "roofline_mfu": model_flops_per_device / peak / step_s if step_s else None,
    "chip_source": slice_.chip.source,
  }


def mesh_shapes(devices: int) -> Iterator[Tuple[int, int, int]]:
  """Every (data, fsdp, tensor) with data * fsdp * tensor == devices (powers of two)."""
  powers = [2**i for i in range(int(math.log2(devices)) + 1)]
  for data, tensor in itertools.product(powers, powers):
    if devices % (data * tensor) == 0:
      yield data, devices // (data * tensor), tensor


def search(
  config: ml_collections.ConfigDict,
  topology: str,
  remat_policies: Sequence[str] = ("none", "full"),
  accum_steps: Sequence[int] = (1, 2, 4),
  max_tensor: int = 8,
  log: Callable[[str], None] = print,
) -> List[Dict]:
  """Plans for the (data, fsdp, tensor) factorisations of the slice, remat policies and
  gradient-accumulation counts whose micro-batch divides the data-parallel size; returns
  those that fit, best roofline MFU first (each compile is logged as it finishes)."""
  slice_ = tpu.parse_slice(topology)
  devices = len(tpu.topology_devices(slice_))
  fits = []
  for remat in remat_policies:
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {remat!r} not in {REMAT_POLICIES}")
    for shape in mesh_shapes(devices):
      if shape[2] > max_tensor:
        continue
      for accum in accum_steps:
        micro = config.train.global_batch // accum
        if config.train.global_batch % accum or micro % (shape[0] * shape[1]):
          continue
        trial = config.copy_and_resolve_references()
        trial.mesh.shape = shape
        trial.model.remat_policy = remat
        trial.train.grad_accum_steps = accum
        try:
          plan = memory_plan(trial, topology)
        except Exception as e:  # noqa: BLE001 (a shape the compiler rejects is skipped)
          log(
            f"mesh {shape} remat {remat} accum {accum}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}"
          )
          continue
        log(
          f"mesh {shape} remat {remat} accum {accum}: "
          f"{plan['total_gib_per_device']:.2f} GiB of {plan['hbm_gib_per_device']:.0f}, "
          f"roofline MFU {plan['roofline_mfu']:.2f}"
        )
        if plan["fits"]:
          fits.append(plan)
  fits.sort(key=lambda p: -(p["roofline_mfu"] or 0.0))
  return fits
