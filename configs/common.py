"""Pieces shared by the stage configs: model sizes as ml_collections ConfigDicts.

A config file picks a size by name (`model=tiny|small|ref_tiny|mistral_7b`); the code
turns the ConfigDict back into a frozen `DecoderConfig` once, at the edge.
"""

import ml_collections

from clara_jax.model.config import DecoderConfig, config_from_dict, config_to_dict, model_config


def model_config_dict(name: str, **overrides) -> ml_collections.ConfigDict:
  """The named size as a ConfigDict whose fields can be overridden from the command line."""
  cfg = config_to_dict(model_config(name, **overrides))
  cfg["lora"] = dict(cfg["lora"]) if cfg["lora"] is not None else None
  if cfg["lora"] is not None:
    cfg["lora"]["adapters"] = tuple(cfg["lora"]["adapters"])
  return ml_collections.ConfigDict(cfg)


def decoder_config(cfg: ml_collections.ConfigDict) -> DecoderConfig:
  """ConfigDict (possibly edited by flags) -> validated DecoderConfig."""
  return config_from_dict(cfg.to_dict())
