"""The train state: trainable and frozen parameters kept apart (flat '/'-path dicts), so
gradients and optimizer state exist only for what a stage trains."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from clara_jax.model import lora

FlatParams = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  trainable: FlatParams
  frozen: FlatParams
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints need no key types

  def params(self) -> Dict:
    """The full nested parameter tree, as the model takes it."""
    return merge_params(self.trainable, self.frozen)


def split_params(params: Any, mask: Any) -> Tuple[FlatParams, FlatParams]:
  """Nested params + boolean mask -> (trainable, frozen) flat dicts."""
  flat, flat_mask = lora.flatten(params), lora.flatten(mask)
  if set(flat) != set(flat_mask):
    raise ValueError(
      f"the trainable mask does not match the parameters: {sorted(set(flat) ^ set(flat_mask))[:5]}"
    )
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  if not trainable:
    raise ValueError("the trainable mask selects no parameter")
  return trainable, {k: v for k, v in flat.items() if not flat_mask[k]}


def merge_params(trainable: FlatParams, frozen: FlatParams) -> Dict:
  return lora.unflatten({**frozen, **trainable})


def create_state(
  params: Any, mask: Any, tx: optax.GradientTransformation, seed: int = 0
) -> TrainState:
  trainable, frozen = split_params(params, mask)
  # flax.struct.dataclass is untyped without flax's stubs: mypy sees no generated __init__.
  return TrainState(  # type: ignore[call-arg]
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    frozen=frozen,
    opt_state=tx.init(trainable),
    rng=jax.random.key_data(jax.random.key(seed)),
  )
