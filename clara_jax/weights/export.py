"""Saving and loading a clara_jax decoder (config.json + orbax params) outside training.

Used by `clara-jax import-hf` so an imported Mistral/Llama base can be the starting point
of a training run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, List, Tuple

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from clara_jax import paths
from clara_jax.data.formats import check_output_dir
from clara_jax.model import layout
from clara_jax.model.config import DecoderConfig, config_from_dict, config_to_dict

if TYPE_CHECKING:
  from etils import epath

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# {file under params/: bytes}, written after the params: a truncated or half-copied export
# is refused by name before orbax reads it (orbax's own error is a page long).
PARAMS_SIZES_FILE = "params_sizes.json"


def _file_sizes(directory: str) -> dict:
  """{path relative to `directory` ("a/b"): bytes} of every file under it, local or in
  an object store. Walked with iterdir (names joined onto the parent), not epath's
  `walk`, whose roots lose the `gs://` scheme on the fsspec backend."""
  out = {}

  def walk(folder: epath.Path, prefix: str) -> None:
    for child in sorted(folder.iterdir(), key=lambda c: c.name):
      name = f"{prefix}{child.name}"
      if child.is_dir():
        walk(child, name + "/")
      else:
        out[name] = paths.size(child)

  walk(paths.path(directory), "")
  return out


@jax.jit
def _all_finite(arrays: List[jax.Array]) -> List[jax.Array]:
  return [jax.numpy.isfinite(x).all() for x in arrays]


def check_finite(items: Iterable[Tuple[str, Any]], where: str) -> None:
  """Refuses NaN or infinite weights, naming the first parameter of `items` ((path,
  array) pairs, numpy or jax) that has any: such a model computes NaN everywhere, and
  nothing downstream would say why. jax arrays are checked where they live, in one
  program (no copy to the host)."""
  import numpy as np

  items = list(items)
  on_host = [isinstance(v, np.ndarray) for _, v in items]
  flags = iter(jax.device_get(_all_finite([v for (_, v), h in zip(items, on_host) if not h])))
  for (path, value), host in zip(items, on_host):
    if bool(np.isfinite(value).all() if host else next(flags)):
      continue
    xp = np if host else jax.numpy
    raise ValueError(
      f"{where}: parameter {path} has {int(xp.isnan(value).sum())} NaN and "
      f"{int(xp.isinf(value).sum())} infinite values; refusing non-finite "
      "weights"
    )


def save_params(out_dir: str, cfg: DecoderConfig, params: Any) -> None:
  """Writes `out_dir/config.json` and `out_dir/params` (an orbax checkpoint); call it
  from every process of a multi-host job. The blocks are written unrolled whatever the
  model's layout (`clara_jax.model.layout`), so exports read the same either way."""
  params = layout.to_unrolled(params)
  out_dir = os.fspath(paths.path(out_dir))  # absolute when local (orbax needs it), URIs kept
  check_output_dir(out_dir)
  paths.makedirs(out_dir)
  # Every process takes part (sharded arrays may live on several hosts); orbax
  # coordinates the write, and process 0 alone writes the config.
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(paths.join(out_dir, PARAMS_DIR), params, force=True)
  if jax.process_index() == 0:
    paths.write_json(
      paths.join(out_dir, PARAMS_SIZES_FILE), _file_sizes(paths.join(out_dir, PARAMS_DIR))
    )
    paths.write_json(paths.join(out_dir, CONFIG_FILE), config_to_dict(cfg), indent=2)


def load_params(in_dir: str, shardings: Any = None) -> Tuple[DecoderConfig, Any]:
  """Reads what `save_params` wrote: returns (DecoderConfig, params).

  `shardings` (a tree of jax.sharding.Sharding matching the unrolled params) places the
  restored arrays, e.g. on another mesh than the one they were saved from. The params
  come back in the layout of the config (stacked when `scan_layers`).
  """
  in_dir = os.fspath(paths.path(in_dir))
  cfg_path = paths.join(in_dir, CONFIG_FILE)
  if not paths.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: missing; expected a directory written by save_params")
  try:
    cfg = config_from_dict(paths.read_json(cfg_path))
  except (ValueError, TypeError, AttributeError) as e:  # JSON syntax, shape or fields
    raise ValueError(
      f"{cfg_path}: not a decoder config written by save_params ({type(e).__name__}: {e})"
    ) from None
  params_dir = paths.join(in_dir, PARAMS_DIR)
  _check_params_files(in_dir, params_dir)
  import flax.linen as nn

  from clara_jax.model.decoder import abstract_params

  abstract = nn.meta.unbox(abstract_params(cfg.replace(scan_layers=False)))
  if shardings is None:
    # Orbax needs a target on a topology other than the writer's; default: one device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: one, abstract)
  abstract = jax.tree_util.tree_map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, abstract)
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise plain Exceptions
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(
      f"{params_dir}: cannot restore the parameters (corrupt or from "
      f"another config?): {type(e).__name__}: {first}"
    ) from None
  check_finite(traverse_util.flatten_dict(params, sep="/").items(), params_dir)
  return cfg, layout.for_config(params, cfg)


def _check_params_files(in_dir: str, params_dir: str) -> None:
  """Every file the export recorded is there at its recorded size (exports written
  before the record existed are not checked)."""
  if not paths.isdir(params_dir):
    raise FileNotFoundError(
      f"{params_dir}: missing; expected the parameters written by save_params"
    )
  sizes_path = paths.join(in_dir, PARAMS_SIZES_FILE)
  if not paths.exists(sizes_path):
    return
  recorded = paths.read_json(sizes_path)
  for name, size in sorted(recorded.items()):
    path = paths.join(params_dir, *name.split("/"))
    if not paths.exists(path):
      raise FileNotFoundError(f"{path}: missing from the export (recorded in {PARAMS_SIZES_FILE})")
    found = paths.size(path)
    if found != size:
      raise ValueError(
        f"{path}: {found} bytes, but the export recorded {size} (truncated or partly copied)"
      )
