"""Training metrics: clu TensorBoard writer, one JSON object per line in
`WORKDIR/metrics.jsonl`, and a parameter overview. Only process 0 writes.

A local `metrics.jsonl` gets each row appended as it is logged. An object store cannot
append: every `paths.open_append` reads and rewrites the whole object, so a row per write
would cost time quadratic in the length of the run. There rows are buffered and stored
together (one rewrite) at every `MetricsWriter.flush` (the training loop calls it before
each checkpoint is saved), at `close`, and whenever REMOTE_FLUSH_ROWS rows are waiting.
A run that stops without `close` (killed, or failed) loses the rows since the last store;
those are all rows of steps after its last checkpoint, which the resumed run drops anyway
(`resume_step`) and logs again. A reader of a remote `metrics.jsonl` mid-run sees the rows
up to the last store.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping

import jax
import numpy as np
from absl import logging

from clara_jax import paths

# Rows buffered at most before a remote `metrics.jsonl` is rewritten (module docstring).
REMOTE_FLUSH_ROWS = 100


class MetricsWriter:
  """Writes scalars to TensorBoard (clu) and appends them to `metrics.jsonl` (at once on
  a local disk, in batches on an object store: see the module docstring)."""

  def __init__(
    self,
    workdir: str,
    tensorboard: bool = True,
    resume_step: int = 0,
    remote_flush_rows: int = REMOTE_FLUSH_ROWS,
  ):
    """`resume_step`: the step training restarts from; rows a killed run logged after
    it are dropped, since the resumed run logs those steps again. `remote_flush_rows`:
    the most rows held back before a remote `metrics.jsonl` is rewritten."""
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    self._pending: List[str] = []
    self._flush_rows = max(1, remote_flush_rows) if paths.is_remote(self.path) else 1
    self._writer = None
    if self.enabled:
      paths.makedirs(workdir)
      self._drop_rows_after(resume_step)
      if tensorboard:
        from clu import metric_writers  # imports tensorflow: only where it is used

        self._writer = metric_writers.create_default_writer(
          paths.join(workdir, "tensorboard"), just_logging=False, asynchronous=True
        )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self._writer is not None:
      self._writer.write_scalars(step, clean)
    self._pending.append(json.dumps({"step": int(step), **clean}) + "\n")
    if len(self._pending) >= self._flush_rows:
      self._store_rows()

  def _store_rows(self) -> None:
    """Appends the pending rows to `metrics.jsonl` in one write."""
    if not self._pending:
      return
    with paths.open_append(self.path) as f:
      f.write("".join(self._pending))
    self._pending = []

  def _drop_rows_after(self, step: int) -> None:
    if not paths.exists(self.path):
      return
    lines = paths.read_text(self.path).splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by the kill
        continue
      if row.get("step", 0) <= step:
        keep.append(json.dumps(row) + "\n")
    if len(keep) != len(lines):
      paths.write_atomic(self.path, keep)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self.enabled and self._writer is not None:
      flat = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
      self._writer.write_hparams(flat)

  def flush(self) -> None:
    """Stores every row logged so far (and flushes TensorBoard). Called before a
    checkpoint is saved, so that the rows of the steps it covers are never lost."""
    self._store_rows()
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    self._store_rows()
    if self._writer is not None:
      self._writer.close()


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  """The rows of `WORKDIR/metrics.jsonl` (for scripts and tests)."""
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def parameter_overview(
  trainable: Dict[str, Any], frozen: Dict[str, Any], shardings: Dict[str, Any] | None = None
) -> str:
  """A start-of-run table: counts per adapter / base, trainable or frozen, and the
  sharding of the largest parameters."""
  counts: Dict[str, list] = {}
  for group, tree in (("trainable", trainable), ("frozen", frozen)):
    for path, value in tree.items():
      adapter = next((p[5:] for p in path.split("/") if p.startswith("lora_")), "base")
      entry = counts.setdefault(adapter, [0, 0])
      entry[0 if group == "trainable" else 1] += int(np.prod(value.shape))
  lines = [f"{'part':<12}{'trainable':>14}{'frozen':>14}"]
  for name, (t, f) in sorted(counts.items()):
    lines.append(f"{name:<12}{t:>14,}{f:>14,}")
  if shardings:
    everything = {**trainable, **frozen}
    largest = sorted(everything, key=lambda k: -int(np.prod(everything[k].shape)))[:5]
    for path in largest:
      spec = getattr(shardings.get(path), "spec", None)
      lines.append(f"  {path} {tuple(everything[path].shape)} {spec}")
  text = "\n".join(lines)
  logging.info("parameters:\n%s", text)
  return text
