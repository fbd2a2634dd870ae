"""One pure train step per stage, `(state, batch) -> (state, metrics)`, and its two
compiled forms: `jit` with NamedShardings over a mesh, or `pmap` data parallelism.

The step differentiates only the trainable parameters, accumulates gradients over
micro-batches with `lax.scan`, and skips (does not apply) an update whose loss or
gradients are not finite, reporting `nonfinite = 1` so the loop can count and stop.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax.train.state import TrainState, merge_params

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]
LossFn = Callable[[dict, Batch, Optional[jax.Array]], Tuple[jax.Array, Metrics]]


def _split_micro(batch: Batch, accum: int) -> Batch:
  """[B, ...] -> [accum, B / accum, ...], keeping each device's rows on that device
  (micro-batch j takes rows j, j + accum, ... of every contiguous shard)."""

  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % accum:
      raise ValueError(f"batch of {x.shape[0]} does not split into {accum} micro-batches")
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree_util.tree_map(split, batch)


def _schedule_count(opt_state: Any) -> Optional[jax.Array]:
  """Updates applied so far (the learning-rate schedule's step), from the optimizer."""
  is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_sched) if is_sched(x)]
  return found[0].count if found else None


def _counters(batch: Batch) -> Metrics:
  """The batch's truncation counters (`truncated_*`), summed."""
  return {k: jnp.sum(v) for k, v in batch.items() if k.startswith("truncated_")}


def _grads_and_metrics(
  loss_of: Callable, trainable: Any, batch: Batch, rng: jax.Array, grad_accum_steps: int
) -> Tuple[jax.Array, Metrics, Any]:
  """(loss, metrics, grads) of `loss_of(trainable, batch, key)` over the whole batch,
  accumulated over `grad_accum_steps` micro-batches."""
  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if grad_accum_steps == 1:
    (loss, metrics), grads = grad_fn(trainable, batch, rng)
    return loss, metrics, grads

  micro = _split_micro(batch, grad_accum_steps)
  keys = jax.random.split(rng, grad_accum_steps)

  def body(
    carry: Tuple[Any, jax.Array, Metrics], inputs: Tuple[Batch, jax.Array]
  ) -> Tuple[Tuple[Any, jax.Array, Metrics], None]:
    micro_batch, key = inputs
    (loss, metrics), grads = grad_fn(trainable, micro_batch, key)
    acc_grads, acc_loss, acc_metrics = carry
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
    return (add(acc_grads, grads), acc_loss + loss, add(acc_metrics, metrics)), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  _, metrics_shape = jax.eval_shape(lambda: loss_of(trainable, first, keys[0]))
  zeros = lambda tree: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
  init = (zeros(trainable), jnp.zeros((), jnp.float32), zeros(metrics_shape))
  (grads, loss, metrics), _ = jax.lax.scan(body, init, (micro, keys))
  scale = lambda tree: jax.tree_util.tree_map(lambda x: x / grad_accum_steps, tree)
  return loss / grad_accum_steps, scale(metrics), scale(grads)


def _across_devices(
  axis_name: str, loss: jax.Array, metrics: Metrics, grads: Any, extra: Metrics
) -> Tuple[jax.Array, Metrics, Any, Metrics]:
  """The pmap reduction: gradients, loss and metrics averaged over the devices, token
  and truncation counts summed."""
  grads = jax.lax.pmean(grads, axis_name)
  counts = {k: jax.lax.psum(v, axis_name) for k, v in metrics.items() if k == "tokens"}
  loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
  metrics.update(counts)
  extra = jax.lax.psum(extra, axis_name)
  return loss, metrics, grads, extra


def make_train_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum_steps: int = 1,
  axis_name: Optional[str] = None,
) -> Callable:
  """Builds `step(state, batch) -> (state, metrics)`.

  `axis_name` (pmap mode) averages gradients and metrics across devices with
  `lax.pmean`; under `jit` the mesh shardings make the batch reduction global.
  """

  def step(state: TrainState, batch: Batch) -> Tuple[TrainState, Metrics]:
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    if axis_name is not None:  # distinct dropout on every device
      step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
    model_batch = {k: v for k, v in batch.items() if not k.startswith("truncated_")}
    loss_of = lambda tr, micro, key: loss_fn(merge_params(tr, state.frozen), micro, key)
    loss, metrics, grads = _grads_and_metrics(
      loss_of, state.trainable, model_batch, step_rng, grad_accum_steps
    )
    extra = _counters(batch)
    if axis_name is not None:
      loss, metrics, grads, extra = _across_devices(axis_name, loss, metrics, grads, extra)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    count = _schedule_count(state.opt_state)
    # `replace` is added by flax.struct.dataclass, which mypy cannot see (untyped decorator).
    new_state = state.replace(  # type: ignore[attr-defined]
      step=state.step + 1,
      trainable=keep(trainable, state.trainable),
      opt_state=keep(opt_state, state.opt_state),
      rng=jax.random.key_data(rng),
    )
    metrics = {
      **metrics,
      **extra,
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": schedule(count if count is not None else state.step),
      "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics

  return step


def jit_train_step(
  step: Callable, mesh: Mesh, state_shardings: Any, batch_shardings: Any
) -> jax.stages.Wrapped:
  """`jax.jit` with explicit NamedShardings; the state is donated (updated in place)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    step,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )


def pmap_train_step(step: Callable, axis_name: str = "batch") -> Callable:
  """`jax.pmap` over local devices: replicated state, batch split on its leading axis
  ([devices, per_device_batch, ...])."""
  return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,))


def state_shardings(
  abstract_state: TrainState,
  param_shardings: Dict[str, NamedSharding],
  tx: optax.GradientTransformation,
  mesh: Mesh,
) -> TrainState:
  """Shardings of a TrainState: parameters (flat '/'-paths) as given, optimizer
  moments like their parameters, every other leaf replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  trainable = {k: param_shardings[k] for k in abstract_state.trainable}
  frozen = {k: param_shardings[k] for k in abstract_state.frozen}
  opt = optax.tree_utils.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract_state.opt_state,
    trainable,
    transform_non_params=lambda _: replicated,
  )
  # A TrainState-shaped tree of shardings (for jit's out_shardings), not of arrays.
  return TrainState(
    step=replicated,  # type: ignore[arg-type]
    trainable=trainable,  # type: ignore[arg-type]
    frozen=frozen,  # type: ignore[arg-type]
    opt_state=opt,
    rng=replicated,  # type: ignore[arg-type]
  )


def replicate(tree: Any, devices: Optional[Sequence[jax.Device]] = None) -> Any:
  """A copy of `tree` per local device, stacked on a new leading axis (pmap inputs)."""
  n = len(jax.local_devices() if devices is None else devices)
  return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated (pmap) tree."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)
