"""Pretraining a from-scratch base decoder on raw text (no pretrained weights here)."""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config("lm", arg)
  c.optimizer.lr = 3e-3  # a small model from scratch learns fast
  return c


def sweep(add):
  for lr in (1e-3, 3e-3):
    add(**{"optimizer.lr": lr})
