"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment."""

from __future__ import annotations

from typing import Optional

import jax


def initialize_distributed(
  auto: bool = False,
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
) -> None:
  """Joins a multi-process job. `auto` lets JAX read the cluster from the environment
  (TPU pods, SLURM); explicit flags serve CPU/GPU clusters and local tests. Nothing
  happens for a single-process run."""
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  elif auto:
    jax.distributed.initialize()
