"""Model sizes through ml_collections, as the stage configs use them."""

import pytest

from configs.common import decoder_config, model_config_dict
from clara_jax.model.config import MODEL_SIZES, model_config


@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_named_sizes_round_trip(name):
  cd = model_config_dict(name)
  assert decoder_config(cd) == model_config(name)


def test_overrides_are_validated():
  cd = model_config_dict("tiny")
  cd.lora.rank = 8
  cd.num_layers = 3
  cfg = decoder_config(cd)
  assert cfg.lora.rank == 8 and cfg.num_layers == 3
  cd.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads"):
    decoder_config(cd)
