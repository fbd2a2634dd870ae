"""The input pipeline: a random-access row source -> shuffled, featurised, batched
numpy examples (grain), one slice per process, with a checkpointable iterator state.

    pipe = InputPipeline(builder.as_data_source("train"), Featurizer(tok, feature_cfg),
                         global_batch=32, seed=0)
    local = next(pipe)                        # this process's [global_batch / P, ...]
    batch = to_global_arrays(local, mesh)     # jax.Arrays sharded over the data axes
    state = pipe.get_state()                  # save with the checkpoint; set_state() resumes

Determinism: the order is a function of (seed, epoch) only: each epoch is a fresh seeded
permutation of the whole source, cut into global batches; process p featurises rows
[p * B/P, (p + 1) * B/P) of each global batch, so the global batch does not depend on
the number of processes.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import grain.python as grain
import jax
import numpy as np
from jax.sharding import Mesh

from clara_jax import partitioning
from clara_jax.data.tfds_builders import decode_row

Example = Dict[str, np.ndarray | np.generic]


class InputPipeline:
  """Iterator of this process's batches; see the module docstring."""

  def __init__(
    self,
    source: Sequence,
    featurize: Callable[[Dict, int], Example],
    global_batch: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    decode: Callable[[Any], Dict] = decode_row,
  ):
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
      raise ValueError(
        f"global batch {global_batch} is not divisible by the {process_count} processes"
      )
    if len(source) < global_batch:
      raise ValueError(f"{len(source)} rows are fewer than one global batch of {global_batch}")
    self.local_batch = lb = global_batch // process_count
    rows = grain.MapDataset.source(source)
    if shuffle:
      rows = rows.shuffle(seed=seed)
    rows = rows.repeat(num_epochs)
    # Every process walks the same global order and featurises only its own contiguous
    # share of each global batch: the assembled global batch is the same whatever the
    # number of processes (a 2-host run sees exactly the batches of a 1-host run).
    to_global = lambda j: (j // lb) * global_batch + process_index * lb + j % lb
    num_local = (len(rows) // global_batch) * lb
    ds = grain.MapDataset.range(num_local).map(
      lambda j: featurize(decode(rows[to_global(j)]), to_global(j))
    )
    self._dataset = ds.batch(lb, drop_remainder=True)
    self._iterator = iter(self._dataset.to_iter_dataset())

  def __iter__(self) -> Iterator[Example]:
    return self

  def __next__(self) -> Example:
    return next(self._iterator)

  def get_state(self) -> Dict[str, Any]:
    """JSON-serialisable position; restoring it replays exactly the following batches."""
    return dict(self._iterator.get_state())

  def set_state(self, state: Dict[str, Any]) -> None:
    self._iterator.set_state(dict(state))


def to_global_arrays(
  local_batch: Example, mesh: Mesh, rules: Any = partitioning.DEFAULT_RULES
) -> Dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays sharded over the batch
  axes of `mesh` (`jax.make_array_from_process_local_data`)."""
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    sharding = partitioning.batch_sharding(mesh, max(value.ndim, 1), rules)
    if value.ndim == 0:
      raise ValueError(f"batch field {key!r} has no batch dimension")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
