"""Saving and loading a clara_jax decoder (config.json + orbax params) outside training.

Used by `clara-jax import-hf` so an imported Mistral/Llama base can be the starting point
of a training run.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from clara_jax.data.formats import check_output_dir, write_json_atomic
from clara_jax.model import layout
from clara_jax.model.config import DecoderConfig, config_from_dict, config_to_dict

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# {file under params/: bytes}, written after the params: a truncated or half-copied export
# is refused by name before orbax reads it (orbax's own error is a page long).
PARAMS_SIZES_FILE = "params_sizes.json"


def _file_sizes(directory: str) -> dict:
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = os.path.getsize(path)
  return out


@jax.jit
def _all_finite(arrays):
  return [jax.numpy.isfinite(x).all() for x in arrays]


def check_finite(items, where: str) -> None:
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
    raise ValueError(f"{where}: parameter {path} has {int(xp.isnan(value).sum())} NaN and "
                     f"{int(xp.isinf(value).sum())} infinite values; refusing non-finite "
                     "weights")


def save_params(out_dir: str, cfg: DecoderConfig, params) -> None:
  """Writes `out_dir/config.json` and `out_dir/params` (an orbax checkpoint); call it
  from every process of a multi-host job. The blocks are written unrolled whatever the
  model's layout (`clara_jax.model.layout`), so exports read the same either way."""
  params = layout.to_unrolled(params)
  out_dir = os.path.abspath(out_dir)
  check_output_dir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  # Every process takes part (sharded arrays may live on several hosts); orbax
  # coordinates the write, and process 0 alone writes the config.
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(out_dir, PARAMS_SIZES_FILE),
                      _file_sizes(os.path.join(out_dir, PARAMS_DIR)))
    write_json_atomic(os.path.join(out_dir, CONFIG_FILE), config_to_dict(cfg), indent=2)


def load_params(in_dir: str, shardings=None):
  """Reads what `save_params` wrote: returns (DecoderConfig, params).

  `shardings` (a tree of jax.sharding.Sharding matching the unrolled params) places the
  restored arrays, e.g. on another mesh than the one they were saved from. The params
  come back in the layout of the config (stacked when `scan_layers`).
  """
  in_dir = os.path.abspath(in_dir)
  cfg_path = os.path.join(in_dir, CONFIG_FILE)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: missing; expected a directory written by save_params")
  try:
    with open(cfg_path) as f:
      cfg = config_from_dict(json.load(f))
  except (ValueError, TypeError, AttributeError) as e:  # JSON syntax, shape or fields
    raise ValueError(f"{cfg_path}: not a decoder config written by save_params "
                     f"({type(e).__name__}: {e})") from None
  params_dir = os.path.join(in_dir, PARAMS_DIR)
  _check_params_files(in_dir, params_dir)
  from clara_jax.model.decoder import abstract_params
  import flax.linen as nn
  abstract = nn.meta.unbox(abstract_params(cfg.replace(scan_layers=False)))
  if shardings is None:
    # Orbax needs a target on a topology other than the writer's; default: one device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: one, abstract)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, abstract)
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise plain Exceptions
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"{params_dir}: cannot restore the parameters (corrupt or from "
                     f"another config?): {type(e).__name__}: {first}") from None
  check_finite(traverse_util.flatten_dict(params, sep="/").items(), params_dir)
  return cfg, layout.for_config(params, cfg)


def _check_params_files(in_dir: str, params_dir: str) -> None:
  """Every file the export recorded is there at its recorded size (exports written
  before the record existed are not checked)."""
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{params_dir}: missing; expected the parameters written by "
                            "save_params")
  sizes_path = os.path.join(in_dir, PARAMS_SIZES_FILE)
  if not os.path.exists(sizes_path):
    return
  with open(sizes_path) as f:
    recorded = json.load(f)
  for name, size in sorted(recorded.items()):
    path = os.path.join(params_dir, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: missing from the export (recorded in "
                              f"{PARAMS_SIZES_FILE})")
    found = os.path.getsize(path)
    if found != size:
      raise ValueError(f"{path}: {found} bytes, but the export recorded {size} "
                       f"(truncated or partly copied)")
