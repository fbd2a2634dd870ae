"""The supervised retrieval baseline ("Sup-"): InfoNCE over labelled positives."""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config("stage2_retrieval", arg)
  c.init.from_workdir = "../stage1_2"
  c.init.copy_adapters = (("compressor", "reasoner"),)
  c.optimizer.lr = 1e-4
  return c


def sweep(add):
  for tau in (0.02, 0.05):
    add(**{"clara.retrieval_temperature": tau})
