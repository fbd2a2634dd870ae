"""Saving and loading a clara_jax decoder (config.json + orbax params) outside training.

Used by `clara-jax import-hf` so an imported Mistral/Llama base can be the starting point
of a training run.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from clara_jax.model.config import DecoderConfig, config_from_dict, config_to_dict

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_params(out_dir: str, cfg: DecoderConfig, params) -> None:
  """Writes `out_dir/config.json` and `out_dir/params` (an orbax checkpoint); call it
  from every process of a multi-host job."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  # Every process takes part (sharded arrays may live on several hosts); orbax
  # coordinates the write, and process 0 alone writes the config.
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
  if jax.process_index() == 0:
    tmp = os.path.join(out_dir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(config_to_dict(cfg), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, CONFIG_FILE))


def load_params(in_dir: str, shardings=None):
  """Reads what `save_params` wrote: returns (DecoderConfig, params).

  `shardings` (a tree of jax.sharding.Sharding matching the params) places the restored
  arrays, e.g. on another mesh than the one they were saved from.
  """
  in_dir = os.path.abspath(in_dir)
  cfg_path = os.path.join(in_dir, CONFIG_FILE)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: missing; expected a directory written by save_params")
  with open(cfg_path) as f:
    cfg = config_from_dict(json.load(f))
  from clara_jax.model.decoder import abstract_params
  import flax.linen as nn
  abstract = nn.meta.unbox(abstract_params(cfg))
  if shardings is None:
    # Orbax needs a target on a topology other than the writer's; default: one device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: one, abstract)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(in_dir, PARAMS_DIR), abstract)
  return cfg, params
