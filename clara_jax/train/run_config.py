"""The config a workdir's checkpoints were trained with, recorded on the first start and
checked on every later one.

Resuming with a changed config would restore state that the new config does not
describe (other shapes: the restore fails; other rates or data: a silently different
run). So a resume with any changed field is refused before anything in the workdir is
touched, and the message names each field with its recorded and its new value. Fields
that only steer logging and saving (`RUN_CONTROL`) may change between resumes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict, Mapping

from absl import logging

from clara_jax import paths

if TYPE_CHECKING:
  import ml_collections

RUN_CONFIG_FILE = "run_config.json"
# Fields a resumed run may change: when and where to log (`train.tensorboard`), save,
# profile or stop on NaNs; how the same step is laid out on the devices (mesh, pmap or
# jit, micro-batches of the same global batch); and how long to train (`train.num_steps`:
# extending a run, whose schedule then follows the new length).
RUN_CONTROL = (
  "train.log_every",
  "train.tensorboard",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.profile_steps",
  "train.peak_flops",
  "train.max_consecutive_nonfinite",
  "train.num_steps",
  "train.parallelism",
  "train.grad_accum_steps",
  "mesh.shape",
  "mesh.rules",
)
# Fields added to the configs after runs were recorded without them, with the value
# those runs had implicitly: a record that lacks one reads as that value, so a newer
# clara_jax resumes an older run.
ADDED_FIELDS = {
  "clara.memory_scale": "none",
  "clara.lexical_weight": 0.0,
  "model.scan_layers": False,
  "clara.compress_chunk": 10,
  # The decoder options of the imported families (Llama-3, Qwen2, Gemma,
  # Gemma-2): off in every run recorded before them.
  "model.rope_scaling": None,
  "model.qkv_bias": False,
  "model.hidden_act": "silu",
  "model.attn_logit_softcapping": None,
  "model.final_logit_softcapping": None,
  "model.query_pre_attn_scalar": None,
  "model.post_norms": False,
  "model.sliding_layer_pattern": None,
}


class ConfigChanged(ValueError):
  """The config differs from the one the workdir's checkpoints were trained with."""


def flat_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """{"dotted.key": JSON value} of a ConfigDict (tuples as lists, as JSON reads them)."""
  out: Dict[str, Any] = {}

  def walk(prefix: str, node: Any) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(name + ".", value)
      else:
        out[name] = json.loads(json.dumps(value, default=str))

  walk("", config)
  return out


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, tuple]:
  """{field: (recorded, current)} of the fields that differ, run-control fields aside
  (a field one side lacks reads as `<absent>`, or as its `ADDED_FIELDS` value)."""
  absent = "<absent>"
  recorded = {**ADDED_FIELDS, **recorded}
  return {
    key: (recorded.get(key, absent), current.get(key, absent))
    for key in sorted(set(recorded) | set(current))
    if key not in RUN_CONTROL and recorded.get(key, absent) != current.get(key, absent)
  }


def check_or_record(
  workdir: str, config: ml_collections.ConfigDict, has_checkpoints: bool, write: bool = True
) -> None:
  """Records the config in `workdir/run_config.json` on a first start; on a resume,
  raises `ConfigChanged` naming every differing field. `write`: False on processes
  other than 0 (they check, process 0 writes)."""
  path = paths.join(workdir, RUN_CONFIG_FILE)
  current = flat_config(config)
  if paths.exists(path):
    try:
      recorded = paths.read_json(path)
    except ValueError as e:
      raise ConfigChanged(
        f"{path}: unreadable ({e}); it records the config of the checkpoints in {workdir}"
      ) from None
    changed = differences(recorded, current)
    if changed and has_checkpoints:
      fields = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
      raise ConfigChanged(
        f"{workdir}: the config differs from the one its checkpoints were trained with "
        f"({path}): {fields}. Resume with the recorded values, or train in another "
        f"--workdir with --config.init.from_checkpoint={workdir} (starts from its "
        f"parameters where path and shape match)"
      )
    if not changed:
      return
  elif has_checkpoints:
    logging.warning(
      "%s: checkpoints without a recorded config (an older run): not "
      "checked; recording the current one",
      workdir,
    )
  if write:
    paths.write_json(path, current)
