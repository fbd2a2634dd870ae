"""Compression instruction tuning: answers from k documents' memories, CE + 0.1 * MSE,
with a fresh generator adapter and the stage1 compressor."""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config("stage1_2", arg)
  c.init.from_workdir = "../stage1"
  c.init.reset_adapters = ("generator",)  # the reference starts a fresh decoder adapter
  return c


def sweep(add):
  for k in (3, 5):
    add(**{"clara.k": k})
