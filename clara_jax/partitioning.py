"""Device meshes and logical-axis rules: how named parameter/activation axes map onto a
(data, fsdp, tensor) mesh.

The model only names its axes (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); the rules here decide placement, so the same code runs
replicated on one CPU and sharded over a pod.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union, cast

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: Tuple[str, ...] = ("data", "fsdp", "tensor")

LogicalRules = Tuple[Tuple[str, Union[str, Tuple[str, ...], None]], ...]

# Batch over data x fsdp; parameters' "embed" over fsdp (ZeRO-3 style) and head/MLP/vocab
# dimensions over tensor (Megatron style). Small axes (LoRA rank, norms, the handful of
# special-token rows) stay replicated.
DEFAULT_RULES: LogicalRules = (
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("lora_rank", None),
  ("extra_vocab", None),
  ("norm", None),
  ("layers", None),  # the stacked axis of scanned blocks: every device holds all layers
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
  """Fills at most one -1 entry so that the product equals `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or num_devices % known:
    raise ValueError(f"mesh shape {shape} does not fit {num_devices} devices")
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} uses {math.prod(shape)} of {num_devices} devices")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Iterable[Any]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), -1 filling one axis."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  try:
    # On TPU slices the device order follows the physical torus (neighbours along the
    # tensor axis share links); shapes it cannot lay out fall back to plain order.
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # CPU or unusual topologies: plain order is fine
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def _divisible_spec(
  spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, where: str
) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (replicating those instead)."""
  fixed: List[Any] = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fixed.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
      logging.info(
        "%s: dimension %d not divisible by mesh axes %s (%d); replicated", where, dim, names, size
      )
      fixed.append(None)
    else:
      fixed.append(axes)
  return PartitionSpec(*fixed)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (abstract or real).

  Leaves without logical names are replicated. A mesh axis that does not divide a
  dimension is dropped for that dimension rather than failing to compile.
  """
  logical_specs = nn.get_partition_spec(boxed_tree)
  unboxed = nn.meta.unbox(boxed_tree)
  is_spec = lambda x: isinstance(x, PartitionSpec)

  def to_sharding(path: Any, spec: Any, leaf: Any) -> NamedSharding:
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    assert mesh_spec is not None  # None only for no names; a tuple of names gives a spec
    where = jax.tree_util.keystr(path)
    return NamedSharding(mesh, _divisible_spec(mesh_spec, leaf.shape, mesh, where))

  return jax.tree_util.tree_map_with_path(to_sharding, logical_specs, unboxed, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over the mesh axes of "activation_batch"."""
  spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, cast(PartitionSpec, spec))


def sharding_summary(shardings: Any) -> Mapping[str, str]:
  """'{path: PartitionSpec}' strings, for the parameter overview at start-up."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(p): str(s.spec) for p, s in flat}
