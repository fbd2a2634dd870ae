"""Salient compressor pretraining (SCP): QA and paraphrase targets, CE + 0.1 * MSE;
trains the compressor and generator adapters and the memory-token embeddings."""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config("stage1", arg)
  c.init.from_workdir = "../lm"  # the pretrained base
  return c


def sweep(add):
  for rate in (4, 16):
    add(**{"clara.compr_rate": rate})
