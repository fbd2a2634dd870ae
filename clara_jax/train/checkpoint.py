"""Orbax checkpoints of the train state plus the data iterator's position.

Each checkpoint step holds two items: `state` (the TrainState arrays) and `data` (JSON:
the input pipeline state). Saving is asynchronous; restoring walks back from the newest
step and skips (with a warning) a checkpoint that is incomplete or cannot be read, so a
crash during a save never strands a run; a skipped step is set aside (renamed, not
deleted) so that the resumed run writes it again. Restoring onto a different mesh passes the
target shardings as the abstract tree.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from clara_jax import paths
from clara_jax.train.state import TrainState


class Checkpointer:
  """`CheckpointManager` wrapper: save every N steps, keep K, resume the newest good."""

  def __init__(self, directory: str, save_every: int = 100, keep: int = 3, async_save: bool = True):
    # Orbax wants an absolute local path or a URI (gs://...): paths.path gives either.
    self.directory = os.fspath(paths.path(directory))
    # Only interval steps (and forced saves: the end, preemption). Orbax's default policy
    # also saves the first step, which would let a resume land between two logging
    # steps and change the next logged window mean.
    policy = ocp.checkpoint_managers.AnySavePolicy(
      [
        ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      save_decision_policy=policy,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  def save(
    self, step: int, state: TrainState, data_state: Dict[str, Any], force: bool = False
  ) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved."""
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
      force=force,
    )

  def should_save(self, step: int) -> bool:
    """Whether `save(step)` would save without `force` (the interval policy)."""
    return self.manager.should_save(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def restore(
    self, abstract_state: TrainState, step: Optional[int] = None
  ) -> Optional[Tuple[int, TrainState, Dict[str, Any]]]:
    """Restores `step` (default: the newest readable one) into the structure, dtypes and
    shardings of `abstract_state` (ShapeDtypeStructs with `sharding` set). Returns None
    when no usable checkpoint exists."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    for candidate in steps:
      try:
        restored = self.manager.restore(
          candidate,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as error:  # orbax raises many types for truncated/corrupt files
        if step is not None:
          raise
        logging.warning(
          "checkpoint %s/%d is unreadable (%s: %s); trying an older one",
          self.directory,
          candidate,
          type(error).__name__,
          str(error).splitlines()[0][:200],
        )
        continue
      self._set_aside([s for s in steps if s > candidate])
      return candidate, restored["state"], dict(restored["data"] or {})
    return None

  def _set_aside(self, unreadable: Sequence[int]) -> None:
    """Renames unreadable steps newer than the restored one to `<step>.unreadable`
    (kept for inspection, never deleted), so the resumed run saves those steps anew
    instead of colliding with them."""
    if not unreadable or jax.process_index() != 0:
      return
    for step in unreadable:
      src = paths.join(self.directory, str(step))
      dst = f"{src}.unreadable"
      n = 1
      while paths.exists(dst):
        dst, n = f"{src}.unreadable{n}", n + 1
      paths.path(src).rename(dst)
      logging.warning("checkpoint %s set aside as %s", src, dst)
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(state_shape: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (what orbax restores onto)."""
  return jax.tree_util.tree_map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape, shardings
  )


def newest_parameters(directory: str) -> Tuple[str, Dict[str, np.ndarray]]:
  """(checkpoint path, {param path: host array}) of the newest readable checkpoint in
  `directory` (a workdir or its `checkpoints/`), read in its own structure: what
  `init.from_checkpoint` starts another run from. Each array is read whole onto this
  host."""
  ckpt_dir = paths.join(directory, "checkpoints")
  ckpt_dir = ckpt_dir if paths.isdir(ckpt_dir) else os.fspath(directory)
  if not paths.isdir(ckpt_dir):
    raise FileNotFoundError(f"{directory}: no such workdir or checkpoint directory")
  steps = sorted((int(d) for d in paths.listdir(ckpt_dir) if d.isdigit()), reverse=True)
  if not steps:
    raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for step in steps:
    path = paths.join(ckpt_dir, str(step), "state")
    try:
      saved = checkpointer.metadata(path).item_metadata
      abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(saved)
      )
      state = checkpointer.restore(path, abstract)
    except Exception as error:  # orbax raises many types for truncated/corrupt files
      logging.warning(
        "checkpoint %s is unreadable (%s: %s); trying an older one",
        path,
        type(error).__name__,
        str(error).splitlines()[0][:200],
      )
      continue
    return path, {k: np.asarray(v) for k, v in {**state["frozen"], **state["trainable"]}.items()}
  raise ValueError(f"{ckpt_dir}: no checkpoint of steps {steps} is readable")
