"""TPU slices by their Cloud names, their chips' public specs, and the slice's devices for
ahead-of-time compiles on a host without TPUs.

    slice_ = parse_slice("v5e-256")      # 256 v5e chips, topology "v5e:16x16"
    devices = topology_devices(slice_)     # needs libtpu (the `tpu` extra)

Cloud TPU names count chips for v5e and v6e (`v5e-256`: 256 chips) and TensorCores for
v4 and v5p (`v5p-128`: 64 chips of 2 cores). The TPU compiler presents a v5p chip as one
device (its two cores as a megacore) and a v4 chip as two devices, so per-device figures
are the chip's figures times chips / devices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import List, Tuple


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  name: str
  bf16_flops: float  # peak dense bf16 FLOP/s per chip
  hbm_bytes: float  # HBM per chip
  hbm_bandwidth: float  # HBM bytes/s per chip
  dims: int  # torus dimensions of a slice (2: v5e/v6e, 3: v4/v5p)
  cores_per_chip_in_name: int  # 2 where the slice name counts TensorCores
  source: str


GIB = 1024**3

CHIPS = {
  # https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s)
  "v4": ChipSpec("v4", 275e12, 32 * GIB, 1200e9, 3, 2, "cloud.google.com/tpu/docs/v4"),
  # https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s)
  "v5e": ChipSpec("v5e", 197e12, 16 * GIB, 819e9, 2, 1, "cloud.google.com/tpu/docs/v5e"),
  # https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s)
  "v5p": ChipSpec("v5p", 459e12, 95 * GIB, 2765e9, 3, 2, "cloud.google.com/tpu/docs/v5p"),
  # https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GiB HBM, 1,640 GB/s)
  "v6e": ChipSpec("v6e", 918e12, 32 * GIB, 1640e9, 2, 1, "cloud.google.com/tpu/docs/v6e"),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  name: str  # as given, e.g. "v5e-256"
  chip: ChipSpec
  chips: int
  shape: Tuple[int, ...]  # chips along each torus axis

  @property
  def topology_name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def _torus_shape(chips: int, dims: int) -> Tuple[int, ...]:
  """The most even power-of-two torus of `chips` chips."""
  shape = [1] * dims
  for _ in range(int(math.log2(chips))):
    shape[shape.index(min(shape))] *= 2
  return tuple(sorted(shape, reverse=dims == 3))  # as Cloud writes them: 16x16, 4x4x2


def parse_slice(name: str) -> TpuSlice:
  """ "v5e-256" -> a TpuSlice; an unknown generation or a count that is not a power of
  two (of at least one chip) is an error naming what is accepted."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip())
  if not m or m.group(1) not in CHIPS:
    raise ValueError(
      f"--topology {name!r}: expected GENERATION-COUNT with GENERATION in "
      f"{sorted(CHIPS)}, e.g. v5e-256 or v5p-128"
    )
  chip, count = CHIPS[m.group(1)], int(m.group(2))
  chips = count // chip.cores_per_chip_in_name
  if chips < 1 or count % chip.cores_per_chip_in_name or chips & (chips - 1):
    raise ValueError(
      f"--topology {name!r}: {count} is not a power-of-two slice of "
      f"{chip.name} ({'TensorCores, 2 per chip' if chip.cores_per_chip_in_name == 2 else 'chips'})"
    )
  return TpuSlice(name=name, chip=chip, chips=chips, shape=_torus_shape(chips, chip.dims))


def topology_devices(slice_: TpuSlice) -> List:
  """The slice's TPU devices for ahead-of-time compiles (`jax.jit(...).lower(...)
  .compile()`); nothing executes on them. Raises ImportError when libtpu is missing."""
  import importlib.util

  if importlib.util.find_spec("libtpu") is None:
    raise ImportError(
      "compiling for a TPU topology needs libtpu: pip install "
      "'clara_jax[tpu]' (or the pinned libtpu of requirements)"
    )
  import os

  # libtpu takes a lockfile for the machine's TPUs; there are none here, and a second
  # process planning at the same time (a test worker, a sweep) would otherwise fail.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  host = (2, 2, 1) if slice_.chips >= 4 else (1, 1, 1)
  topology = topologies.get_topology_desc(
    platform="tpu", topology_name=slice_.topology_name, chips_per_host_bounds=host, num_slices=1
  )
  return list(topology.devices)
