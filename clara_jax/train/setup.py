"""The one set-up of a stage's compiled train step, shared by `train` and `plan`.

    setup = setup_train_step(config, cfg, params)        # params: real or abstract
    state_shape = setup.abstract_state(params)
    state_sh = setup.state_shardings(state_shape)
    step = setup.jit(state_sh, batch_sh)                   # what the loop runs
    compiled = setup.compile(state_shape, state_sh, batch)  # what plan measures

Training and the ahead-of-time plan go through the same function, so what `plan` compiles
for a pod is the step `train` would run there (maxtext's `setup_train_loop` idea).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, Sharding

from clara_jax import partitioning
from clara_jax.data import features, packing, tokenizer
from clara_jax.model import lora, stages
from clara_jax.model.clara import ClaraConfig
from clara_jax.model.config import DecoderConfig, config_from_dict
from clara_jax.model.decoder import abstract_params
from clara_jax.model.flops import StepShapes, train_step_flops
from clara_jax.train import optimizer
from clara_jax.train.state import TrainState, create_state
from clara_jax.train.step import jit_train_step, make_train_step, state_shardings

if TYPE_CHECKING:
  import contextlib

  import ml_collections


def clara_config(config: ml_collections.ConfigDict) -> ClaraConfig:
  """The CLaRa lengths and loss settings of a config's `clara` block."""
  c = config.clara
  return ClaraConfig(
    doc_max_length=c.doc_max_length,
    compr_rate=c.compr_rate,
    k=c.k,
    temperature=c.temperature,
    mse_weight=c.mse_weight,
    train_compressor=c.train_compressor,
    train_generator=c.train_generator,
    train_base=c.train_base,
    retrieval_temperature=c.retrieval_temperature,
    memory_scale=c.memory_scale,
    lexical_weight=c.lexical_weight,
    check_nans=c.check_nans,
    compress_chunk=c.compress_chunk,
  )


@dataclasses.dataclass(frozen=True)
class TrainStepSetup:
  """What a stage's step is built from: the model, the optimizer, which parameters
  train, the mesh and the parameters' shardings on it."""

  config: Any  # the run's ml_collections ConfigDict (untyped)
  cfg: DecoderConfig
  cclara: ClaraConfig
  mesh: Mesh
  rules: partitioning.LogicalRules
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  mask: dict
  step_fn: Callable
  params_sh: Dict[str, NamedSharding]

  def abstract_state(self, params: Any) -> TrainState:
    """ShapeDtypeStructs of the train state `create_state(params, ...)` builds."""
    return jax.eval_shape(lambda p: create_state(p, self.mask, self.tx, self.config.seed), params)

  def state_shardings(self, state_shape: TrainState) -> TrainState:
    return state_shardings(state_shape, self.params_sh, self.tx, self.mesh)

  def batch_shardings(self, batch: Dict[str, Any]) -> Dict[str, NamedSharding]:
    """Each input split over the data-parallel axes on its leading (batch) dimension."""
    return {
      k: partitioning.batch_sharding(self.mesh, len(v.shape), self.rules) for k, v in batch.items()
    }

  def jit(self, state_sh: TrainState, batch_sh: Mapping[str, Sharding]) -> jax.stages.Wrapped:
    """The jitted step (state donated); call it inside `self.context()`."""
    return jit_train_step(self.step_fn, self.mesh, state_sh, batch_sh)

  def context(self) -> contextlib.ExitStack:
    """The mesh and logical-axis rules the step is traced under."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def lower(
    self, state_shape: TrainState, state_sh: TrainState, batch: Dict[str, jax.ShapeDtypeStruct]
  ) -> jax.stages.Lowered:
    """The step lowered for abstract inputs (`batch`: {name: ShapeDtypeStruct})."""
    batch_sh = self.batch_shardings(batch)
    with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    with self.context():
      return self.jit(state_sh, batch_sh).lower(
        jax.tree_util.tree_map(with_sharding, state_shape, state_sh),
        {k: with_sharding(v, batch_sh[k]) for k, v in batch.items()},
      )


def stage_decoder_config(config: ml_collections.ConfigDict) -> DecoderConfig:
  """The decoder of `config`'s model fields, with rows for its tokenizer's special
  tokens (<ENC>, <SEP>, <AE> and the memory tokens); `train` takes the count from the
  tokenizer it loads, which has the same."""
  fields = config.model.to_dict()
  fields["num_extra_tokens"] = tokenizer.num_special_tokens(config.tokenizer.num_mem_tokens)
  return config_from_dict(fields)


def setup_train_step(
  config: ml_collections.ConfigDict,
  cfg: DecoderConfig,
  params: Any,
  *,
  replay: bool = False,
  devices: Optional[Sequence[jax.Device]] = None,
  axis_name: Optional[str] = None,
) -> TrainStepSetup:
  """The step of `config.stage` for model `cfg` whose parameters are `params` (real
  arrays or ShapeDtypeStructs: only their paths and shapes are read). `replay`: the
  stage also trains on replay text (`data.replay_text`). `devices`: the mesh's devices
  (default: all; a TPU topology's devices for an ahead-of-time plan). `axis_name`: the
  pmap axis when the step runs under `pmap` instead of a mesh."""
  cclara = clara_config(config)
  mask = stages.trainable_mask(config.stage, params, cclara)
  if config.optimizer.frozen:
    mask = optimizer.freeze_by_path(mask, config.optimizer.frozen)
  schedule, tx = _schedule_and_optimizer(config, mask)
  loss_fn = stages.stage_loss(config.stage, cfg, cclara)
  if replay:
    loss_fn = stages.with_replay(loss_fn, cfg, config.clara.replay_weight)
  step_fn = make_train_step(
    loss_fn, tx, schedule, config.train.grad_accum_steps, axis_name=axis_name
  )
  mesh = partitioning.make_mesh(config.mesh.shape, devices)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  _check_micro_batch(config, mesh, axis_name)
  params_sh = cast(
    Dict[str, NamedSharding],
    lora.flatten(partitioning.logical_shardings(abstract_params(cfg), mesh, rules)),
  )
  return TrainStepSetup(
    config=config,
    cfg=cfg,
    cclara=cclara,
    mesh=mesh,
    rules=rules,
    schedule=schedule,
    tx=tx,
    mask=mask,
    step_fn=step_fn,
    params_sh=params_sh,
  )


def _schedule_and_optimizer(
  config: ml_collections.ConfigDict, mask: Any
) -> Tuple[optax.Schedule, optax.GradientTransformation]:
  """The learning-rate schedule and the optimizer of `config.optimizer`; the
  per-path learning-rate multipliers must name trainable parameters (`mask`)."""
  o = config.optimizer
  schedule = optimizer.learning_rate_schedule(
    o.lr, config.train.num_steps, o.schedule, o.warmup_ratio, o.final_ratio
  )
  optimizer.check_lr_multipliers(
    o.lr_multipliers, [path for path, on in lora.flatten(mask).items() if on]
  )
  tx = optimizer.make_optimizer(
    schedule, o.b1, o.b2, o.weight_decay, o.clip_norm, lr_multipliers=o.lr_multipliers
  )
  return schedule, tx


def _check_micro_batch(
  config: ml_collections.ConfigDict, mesh: Mesh, axis_name: Optional[str]
) -> None:
  """A micro-batch must split evenly over the data-parallel devices."""
  data_parallel = (
    jax.device_count() if axis_name is not None else mesh.shape["data"] * mesh.shape["fsdp"]
  )
  micro_batch = config.train.global_batch // config.train.grad_accum_steps
  if micro_batch % data_parallel:
    raise ValueError(
      f"config: train.global_batch / grad_accum_steps = {micro_batch} is not "
      f"divisible by the data-parallel size {data_parallel} "
      f"(mesh {dict(mesh.shape)}, parallelism={config.train.parallelism})"
    )


def abstract_batch(
  config: ml_collections.ConfigDict, n_mem: int
) -> Dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one global batch of the stage (int32 tokens and masks), as the input
  pipeline makes it."""
  d, b, c = config.data, config.train.global_batch, config.clara
  doc = packing.encoder_length(c.doc_max_length, n_mem)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  if config.stage == "lm":
    return _with_counters({"tokens": i32(b, d.lm_length), "mask": i32(b, d.lm_length)}, "lm", b)
  gen_len = d.prompt_length + d.answer_length
  docs = {"stage1": 1, "stage1_2": c.k}.get(config.stage, d.candidates)
  k = 1 if config.stage == "stage1" else c.k
  batch = {
    "doc_tokens": i32(b, docs, doc),
    "doc_mask": i32(b, docs, doc),
    "gen_tokens": i32(b, gen_len),
    "gen_mask": i32(b, gen_len),
    "slot_positions": i32(b, k * n_mem),
    "answer_mask": i32(b, d.answer_length),
  }
  if config.stage in ("stage2", "stage2_retrieval"):
    q = packing.encoder_length(d.question_max_length, n_mem)
    batch.update(q_tokens=i32(b, q), q_mask=i32(b, q), positives=i32(b, docs))
  return _with_counters(batch, config.stage, b)


def _with_counters(
  batch: Dict[str, jax.ShapeDtypeStruct], stage: str, b: int
) -> Dict[str, jax.ShapeDtypeStruct]:
  """`batch` and the truncation counters the input pipeline adds to every example (the
  step sums them into its metrics, so they are part of the compiled program)."""
  return {
    **batch,
    **{name: jax.ShapeDtypeStruct((b,), jnp.int32) for name in features.truncation_counters(stage)},
  }


def step_shapes(config: ml_collections.ConfigDict, n_mem: int) -> StepShapes:
  """The token lengths of one global batch of `config`'s stage."""
  d, c = config.data, config.clara
  return StepShapes(
    batch=config.train.global_batch,
    doc_tokens=packing.encoder_length(c.doc_max_length, n_mem),
    n_mem=n_mem,
    candidates=d.candidates,
    k=c.k,
    question_tokens=packing.encoder_length(d.question_max_length, n_mem),
    gen_tokens=d.prompt_length + d.answer_length,
    answer_tokens=d.answer_length,
    lm_tokens=d.lm_length,
  )


def step_flops(
  config: ml_collections.ConfigDict, cfg: DecoderConfig, cclara: ClaraConfig, cached: bool = False
) -> float:
  """FLOPs one train step of `config` executes (`clara_jax.model.flops`); `cached`:
  stage2 reads its candidates' memories from a cache instead of compressing them."""
  return train_step_flops(
    config.stage,
    cfg,
    step_shapes(config, cclara.n_mem),
    cached=cached,
    train_base=cclara.train_base,
    train_generator=cclara.train_generator,
    train_compressor=cclara.train_compressor,
    lexical=cclara.lexical_weight > 0,
    mse=cclara.mse_weight > 0,
  )
