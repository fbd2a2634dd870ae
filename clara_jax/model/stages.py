"""The loss of every training stage, and the parameters each stage trains.

Each loss is a pure `loss_fn(params, batch, rng) -> (loss, metrics)` over a dict of
arrays (layouts in `clara_jax.model.clara`, shape letters in `clara_jax.model`);
`trainable_mask(stage, params, clara_cfg)` gives the optimizer mask of the paper's
trainable set. Batch keys:

* lm: `tokens [B, T]`, `mask [B, T]`.
* stage1 / stage1_2: `doc_tokens [B, k, Ld + n_mem]`, `doc_mask`, and the generator
  arrays `gen_tokens [B, P + A]`, `gen_mask`, `slot_positions [B, k * n_mem]`,
  `answer_mask [B, A]` (stage1: k = 1; stage1_2: k documents per question).
* stage2: `q_tokens [B, Lq + n_mem]`, `q_mask`, candidates as `doc_tokens
  [B, N, Ld + n_mem]` + `doc_mask` or precomputed `doc_mem [B, N, n_mem, D]`, the
  generator arrays with k slots, optional `positives [B, N]` (gold candidates) for
  retrieval metrics.
* stage2_retrieval: `q_tokens`, `q_mask`, candidates as above, `positives [B, N]`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, TypeAlias, cast

import jax
import jax.numpy as jnp

from clara_jax.model import clara, lora
from clara_jax.model.clara import ClaraConfig
from clara_jax.model.config import DecoderConfig
from clara_jax.model.decoder import Decoder
from clara_jax.ops import losses
from clara_jax.ops.topk import soft_topk, straight_through_topk

Array: TypeAlias = jax.Array
Batch = Dict[str, Array]
Metrics = Dict[str, Array]
# A PRNG key for LoRA dropout, or None: deterministic (evaluation).
Rng: TypeAlias = Optional[Array]
# A nested dict of parameter arrays (or of their boolean masks).
Params: TypeAlias = Any
LossFn = Callable[[Params, Batch, Rng], Tuple[Array, Metrics]]

STAGES = ("lm", "stage1", "stage1_2", "stage2", "stage2_retrieval")
# Documents per example compressed in one pass of a frozen compressor: ~10 kept the
# working set in cache on the CPU (faster than all candidates at once).
COMPRESS_CHUNK = 10


def trainable_mask(stage: str, params: Params, clara_cfg: ClaraConfig) -> Params:
  """Optimizer mask of the stage's trainable set (the base model is always frozen, except
  in `lm`, which pretrains a from-scratch base)."""
  if stage == "lm":
    return lora.trainable_mask(params, base=True)
  if stage in ("stage1", "stage1_2"):
    # As in the reference, the special-token embedding rows train in stage1 only.
    return lora.trainable_mask(
      params,
      adapters=(clara.COMPRESSOR, clara.GENERATOR),
      extra_embedding=stage == "stage1",
      base=clara_cfg.train_base,
    )
  if stage == "stage2":
    adapters = (clara.REASONER,) + ((clara.GENERATOR,) if clara_cfg.train_generator else ())
    if clara_cfg.train_compressor:
      adapters += (clara.COMPRESSOR,)
    return lora.trainable_mask(params, adapters=adapters)
  if stage == "stage2_retrieval":
    return lora.trainable_mask(params, adapters=(clara.REASONER,))
  raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")


def _split(rng: Rng, n: int) -> List[Rng]:
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def lm_loss(model: Decoder, params: Params, batch: Batch, rng: Rng = None) -> Tuple[Array, Metrics]:
  """Next-token CE over every real token (from-scratch base pretraining, no adapter)."""
  tokens_bt, mask_bt = batch["tokens"], batch["mask"]
  hidden_btd = clara.final_states(
    model, params, mask_bt, None, deterministic=rng is None, rng=rng, tokens=tokens_bt
  )
  logits = cast(Array, model.apply({"params": params}, hidden_btd[:, :-1], method=Decoder.logits))
  target_mask = mask_bt[:, 1:] * mask_bt[:, :-1]
  ce, count = losses.masked_cross_entropy(logits, tokens_bt[:, 1:], target_mask)
  return ce, {"ce": ce, "tokens": count}


def compression_loss(
  model: Decoder, params: Params, batch: Batch, clara_cfg: ClaraConfig, rng: Rng = None
) -> Tuple[Array, Metrics]:
  """stage1 / stage1_2: CE of the answer from the documents' memories + w * MSE
  (+ the memories' bag-of-tokens loss when `lexical_weight` > 0)."""
  comp_rng, gen_rng = _split(rng, 2)
  mem_bkmd, mse = _document_memories(model, params, batch, clara_cfg, comp_rng)
  ce, count = _answer_loss(model, params, batch, mem_bkmd, clara_cfg.memory_scale, gen_rng)
  loss, metrics = ce, {"ce": ce, "tokens": count}
  if mse is not None:
    loss = loss + clara_cfg.mse_weight * mse
    metrics["mse"] = mse
  if clara_cfg.lexical_weight > 0:
    lexical = _lexical_loss(model, params, batch, mem_bkmd)
    loss = loss + clara_cfg.lexical_weight * lexical
    metrics["lexical"] = lexical
  b, k = mem_bkmd.shape[:2]
  if b * k > 1:
    metrics["memory_cosine"] = memory_cosine(jax.lax.stop_gradient(mem_bkmd).reshape(b * k, -1))
  return loss, metrics


def _document_memories(
  model: Decoder, params: Params, batch: Batch, clara_cfg: ClaraConfig, rng: Rng
) -> Tuple[Array, Optional[Array]]:
  """(the compressor's memories [B, k, n_mem, D] of the batch's documents, their alignment
  MSE, or None when `mse_weight` is 0)."""
  b, k = batch["doc_tokens"].shape[:2]
  tokens, mask, n_mem = batch["doc_tokens"], batch["doc_mask"], clara_cfg.n_mem
  if clara_cfg.mse_weight > 0:
    mem, mse = clara.compress(
      model, params, tokens, mask, n_mem, deterministic=rng is None, rng=rng
    )
  else:  # no alignment loss: the last layer runs at the memory positions only
    mem = clara.memories(
      model, params, tokens, mask, n_mem, clara.COMPRESSOR, deterministic=rng is None, rng=rng
    )
    mse = None
  return mem.reshape(b, k, n_mem, -1), mse


def _lexical_loss(model: Decoder, params: Params, batch: Batch, mem_bkmd: Array) -> Array:
  """`clara.lexical_loss` of the memories [B, k, n_mem, D] against their documents."""
  b, k, n_mem = mem_bkmd.shape[:3]
  return clara.lexical_loss(
    model,
    params,
    mem_bkmd.reshape(b * k, n_mem, -1),
    batch["doc_tokens"].reshape(b * k, -1),
    batch["doc_mask"].reshape(b * k, -1),
  )


def _answer_loss(
  model: Decoder, params: Params, batch: Batch, mem_bkmd: Array, memory_scale: str, rng: Rng = None
) -> Tuple[Array, Array]:
  """`clara.generator_loss` of the batch's generator arrays with memories [B, k, n_mem, D]
  in its slots (deterministic without `rng`): (mean answer CE, answer tokens)."""
  return clara.generator_loss(
    model,
    params,
    batch["gen_tokens"],
    batch["gen_mask"],
    batch["slot_positions"],
    mem_bkmd,
    batch["answer_mask"],
    deterministic=rng is None,
    rng=rng,
    memory_scale=memory_scale,
  )


def memory_cosine(memories_flat: Array) -> Array:
  """Mean cosine similarity between the memories of different documents (each flattened
  to one vector: R rows [R, n_mem * D], R >= 2): near 1 when the compressor writes the
  same memory for every document (a collapse that no loss shows directly)."""
  flat = memories_flat.astype(jnp.float32)
  unit = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
  gram = unit @ unit.T
  m = flat.shape[0]
  return (jnp.sum(gram) - jnp.trace(gram)) / (m * (m - 1))


def candidate_memories(
  model: Decoder, params: Params, batch: Batch, clara_cfg: ClaraConfig, rng: Rng = None
) -> Array:
  """Candidate memories [B, N, n_mem, D]: from the `doc_mem` cache when the batch has
  one, else recomputed by the compressor (frozen unless `train_compressor`)."""
  if "doc_mem" in batch:
    return jax.lax.stop_gradient(batch["doc_mem"])
  if not clara_cfg.train_compressor:
    return frozen_compress(
      model,
      params,
      batch["doc_tokens"],
      batch["doc_mask"],
      clara_cfg.n_mem,
      clara_cfg.compress_chunk,
    )
  b, n = batch["doc_tokens"].shape[:2]
  train = rng is not None
  mem = clara.memories(
    model,
    params,
    batch["doc_tokens"],
    batch["doc_mask"],
    clara_cfg.n_mem,
    clara.COMPRESSOR,
    deterministic=not train,
    rng=rng if train else None,
  )
  return mem.reshape(b, n, clara_cfg.n_mem, -1)


def _chunk(n: int, target: int) -> int:
  """The largest divisor of n not above target."""
  return max(c for c in range(1, min(n, target) + 1) if n % c == 0)


def fold_compressor(model: Decoder, params: Params) -> Params:
  """Parameters whose base kernels hold the frozen compressor adapter (`lora.fold_adapter`),
  without gradients: run them with adapter=None for the compressor's memories at the
  base model's cost. Inside a jitted function the folded kernels are temporaries."""
  params = jax.lax.stop_gradient(params)
  if model.cfg.lora is not None:
    params = lora.fold_adapter(params, clara.COMPRESSOR, model.cfg.lora)
  return params


def frozen_memories(
  model: Decoder, params: Params, tokens_rt: Array, mask_rt: Array, n_mem: int
) -> Array:
  """Memories [R, n_mem, D] of a frozen compressor for encoder rows [R, Lt + n_mem]: what
  answering and indexing compute, through the same folded path as stage 2's step."""
  return clara.memories(
    model, fold_compressor(model, params), tokens_rt, mask_rt, n_mem, adapter=None
  )


def frozen_compress(
  model: Decoder,
  params: Params,
  doc_tokens_bnt: Array,
  doc_mask_bnt: Array,
  n_mem: int,
  chunk: int = COMPRESS_CHUNK,
) -> Array:
  """Memories [B, N, n_mem, D] of a frozen compressor, without gradients.

  The compressor adapter is folded into the base kernels (one matmul per layer instead of
  three), and the documents go through in chunks of `chunk` per example (a loop, so the
  working set of each pass stays in cache); the batch axis stays whole in every chunk, so
  its sharding is untouched.
  """
  params = fold_compressor(model, params)
  b, n, length = doc_tokens_bnt.shape
  c = _chunk(n, chunk)

  def to_chunks(x_bnt: Array) -> Array:
    return x_bnt.reshape(b, n // c, c, length).swapaxes(0, 1)

  # Each chunk array is [b, c, length]; `memories` flattens them to b * c rows.
  def one(chunk_arrays: Tuple[Array, Array]) -> Array:
    mem = clara.memories(model, params, *chunk_arrays, n_mem, adapter=None)
    return mem.reshape(b, c, n_mem, -1)

  mem = jax.lax.map(one, (to_chunks(doc_tokens_bnt), to_chunks(doc_mask_bnt)))
  return mem.swapaxes(0, 1).reshape(b, n, n_mem, -1)


def retrieval_metrics(scores_bn: Array, indices_bk: Array, positives_bn: Array) -> Metrics:
  """Recall@1 and Recall@k (hits among positives / number of positives), averaged over
  questions that have positives."""
  pos = positives_bn.astype(jnp.float32)
  n_pos = jnp.sum(pos, -1)
  has_pos = (n_pos > 0).astype(jnp.float32)
  hits = jnp.take_along_axis(pos, indices_bk, axis=-1)  # [B, k]

  def recall(at: int) -> Array:
    per_q = jnp.sum(hits[:, :at], -1) / jnp.maximum(n_pos, 1.0)
    return jnp.sum(per_q * has_pos) / jnp.maximum(jnp.sum(has_pos), 1.0)

  return {"recall@1": recall(1), f"recall@{indices_bk.shape[1]}": recall(indices_bk.shape[1])}


def _query_scores(
  model: Decoder, params: Params, batch: Batch, clara_cfg: ClaraConfig, comp_rng: Rng, q_rng: Rng
) -> Tuple[Array, Array]:
  """(cosine scores [B, N] of each question's reasoner memories against its candidates,
  the candidates' memories [B, N, n_mem, D]); deterministic without `q_rng`."""
  doc_mem_bnmd = candidate_memories(model, params, batch, clara_cfg, comp_rng)
  q_mem_bmd = clara.reason(
    model,
    params,
    batch["q_tokens"],
    batch["q_mask"],
    clara_cfg.n_mem,
    deterministic=q_rng is None,
    rng=q_rng,
  )
  return clara.score(q_mem_bmd, doc_mem_bnmd), doc_mem_bnmd


def end_to_end_loss(
  model: Decoder,
  params: Params,
  batch: Batch,
  clara_cfg: ClaraConfig,
  rng: Rng = None,
  cut_topk_gradient: bool = False,
) -> Tuple[Array, Metrics]:
  """stage2: reasoner -> cosine scores -> straight-through top-k -> generator CE.

  `cut_topk_gradient` stops the gradient at the top-k weights (an ablation: the
  reasoner then learns nothing from the answer loss).
  """
  comp_rng, q_rng, gen_rng = _split(rng, 3)
  scores_bn, doc_mem_bnmd = _query_scores(model, params, batch, clara_cfg, comp_rng, q_rng)
  weights_bkn, indices_bk = straight_through_topk(
    scores_bn, clara_cfg.k, clara_cfg.temperature, check_nans=clara_cfg.check_nans
  )
  if cut_topk_gradient:
    weights_bkn = jax.lax.stop_gradient(weights_bkn)
  selected_bkmd = clara.select(weights_bkn, doc_mem_bnmd)
  ce, count = _answer_loss(model, params, batch, selected_bkmd, clara_cfg.memory_scale, gen_rng)
  metrics = {
    "ce": ce,
    "tokens": count,
    "selected_score": jnp.mean(jnp.take_along_axis(scores_bn, indices_bk, -1)),
    "selection_entropy": _selection_entropy(scores_bn, weights_bkn, clara_cfg.temperature),
  }
  if "positives" in batch:
    metrics.update(retrieval_metrics(scores_bn, indices_bk, batch["positives"]))
  return ce, metrics


def _selection_entropy(scores_bn: Array, weights_bkn: Array, temperature: float) -> Array:
  """Mean entropy of the soft top-k distributions of the hard selection (a metric: no
  gradient)."""
  soft_bkn = jax.lax.stop_gradient(
    soft_topk(scores_bn, jax.lax.stop_gradient(weights_bkn), temperature)
  )
  entropy_bk = -jnp.sum(soft_bkn * jnp.log(jnp.maximum(soft_bkn, 1e-30)), -1)
  return jnp.mean(entropy_bk)


def retrieval_loss(
  model: Decoder, params: Params, batch: Batch, clara_cfg: ClaraConfig, rng: Rng = None
) -> Tuple[Array, Metrics]:
  """stage2_retrieval: supervised InfoNCE over the labelled positives."""
  comp_rng, q_rng = _split(rng, 2)
  scores_bn, _ = _query_scores(model, params, batch, clara_cfg, comp_rng, q_rng)
  loss = losses.infonce_loss(scores_bn, batch["positives"], clara_cfg.retrieval_temperature)
  _, indices_bk = jax.lax.top_k(scores_bn, min(clara_cfg.k, scores_bn.shape[-1]))
  return loss, {"infonce": loss, **retrieval_metrics(scores_bn, indices_bk, batch["positives"])}


def stage_loss(stage: str, model_cfg: DecoderConfig, clara_cfg: ClaraConfig) -> LossFn:
  """`loss_fn(params, batch, rng)` of a stage; rng None means deterministic (eval)."""
  model = Decoder(model_cfg)
  fns = {
    "lm": lambda p, b, r: lm_loss(model, p, b, r),
    "stage1": lambda p, b, r: compression_loss(model, p, b, clara_cfg, r),
    "stage1_2": lambda p, b, r: compression_loss(model, p, b, clara_cfg, r),
    "stage2": lambda p, b, r: end_to_end_loss(model, p, b, clara_cfg, r),
    "stage2_retrieval": lambda p, b, r: retrieval_loss(model, p, b, clara_cfg, r),
  }
  if stage not in fns:
    raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
  return fns[stage]


def with_replay(loss_fn: LossFn, model_cfg: DecoderConfig, weight: float) -> LossFn:
  """`loss_fn` plus `weight` x the LM loss of the base (no adapter) on the batch's replay
  text (`replay_tokens [B, T]`, `replay_mask`), so that a stage which updates the base
  keeps what the base knows of that text; unchanged on batches without replay text."""
  model = Decoder(model_cfg)

  def fn(params: Params, batch: Batch, rng: Rng = None) -> Tuple[Array, Metrics]:
    if "replay_tokens" not in batch:
      return loss_fn(params, batch, rng)
    stage_rng, replay_rng = _split(rng, 2)
    inner = {k: v for k, v in batch.items() if not k.startswith("replay_")}
    loss, metrics = loss_fn(params, inner, stage_rng)
    replay_ce, _ = lm_loss(
      model, params, {"tokens": batch["replay_tokens"], "mask": batch["replay_mask"]}, replay_rng
    )
    return loss + weight * replay_ce, {**metrics, "replay_ce": replay_ce}

  return fn


def fixed_selection(positives_bn: Array, k: int, rng: Array, gold: bool) -> Array:
  """Indices [B, k] of a fixed (not retrieved) selection: gold candidates first, then
  random non-gold ones (`gold=True`), or k random non-gold candidates (`gold=False`)."""
  noise = jax.random.uniform(rng, positives_bn.shape)
  pos = positives_bn.astype(jnp.float32)
  priority = noise + (2.0 * pos if gold else -2.0 * pos)
  return jax.lax.top_k(priority, k)[1].astype(jnp.int32)


def memory_gain(
  model: Decoder, params: Params, batch: Batch, clara_cfg: ClaraConfig, rng: Array
) -> Metrics:
  """Does the generator read its memories? Answer CE with k random non-gold candidates
  minus answer CE with the gold candidate(s) in the slots (positive: reading pays).

  Needs a stage2-style batch with `positives`; evaluation only (deterministic).
  """
  doc_mem_bnmd = candidate_memories(model, params, batch, clara_cfg)
  n = doc_mem_bnmd.shape[1]
  k = clara_cfg.k

  def ce_for(indices_bk: Array) -> Array:
    weights_bkn = jax.nn.one_hot(indices_bk, n, dtype=jnp.float32)
    selected_bkmd = clara.select(weights_bkn, doc_mem_bnmd)
    return _answer_loss(model, params, batch, selected_bkmd, clara_cfg.memory_scale)[0]

  gold_rng, control_rng = jax.random.split(rng)
  ce_gold = ce_for(fixed_selection(batch["positives"], k, gold_rng, gold=True))
  ce_control = ce_for(fixed_selection(batch["positives"], k, control_rng, gold=False))
  return {"ce_gold": ce_gold, "ce_control": ce_control, "memory_gain": ce_control - ce_gold}
