"""End-to-end: query reasoner + straight-through top-k + generator, answer CE only; the
reasoner starts as a copy of the compressor."""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config("stage2", arg)
  c.init.from_workdir = "../stage1_2"
  c.init.copy_adapters = (("compressor", "reasoner"),)
  c.optimizer.lr = 5e-6  # paper: 5e-6, constant
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_ratio = 0.0
  return c


def sweep(add):
  for lr in (5e-6, 1e-4):
    for tau in (0.02, 0.1):
      add(**{"optimizer.lr": lr, "clara.temperature": tau})
