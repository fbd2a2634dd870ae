"""Time of one compiled training step (loss + gradients + Adam update) per stage, on
random token ids laid out like a real batch, with tokens/s and MFU.

The step is the one `train` runs: the stage's config file at the benchmark's shapes,
set up by `train.setup.setup_train_step` (also what `plan` compiles)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.data import features, packing, tokenizer
from clara_jax.model import clara
from clara_jax.model.decoder import Decoder, init_params
from clara_jax.train.peak import matmul_peak_flops, time_fn
from clara_jax.train.setup import setup_train_step, stage_decoder_config, step_flops
from clara_jax.train.state import create_state

if TYPE_CHECKING:
  import ml_collections

  from clara_jax.train.setup import TrainStepSetup

STAGES = ("lm", "stage1", "stage1_2", "stage2")


def documents_per_question(stage: str, candidates: int, k: int) -> int:
  """Documents each example compresses: stage1 its own, stage1_2 its k, stage2 all
  candidates."""
  return {"stage1": 1, "stage1_2": k}.get(stage, candidates)


def synthetic_batch(
  stage: str,
  rng: np.random.Generator,
  base_vocab: int,
  batch: int,
  candidates: int,
  doc_len: int,
  question_len: int,
  prompt_len: int,
  answer_len: int,
  clara_cfg: clara.ClaraConfig,
) -> Dict[str, np.ndarray]:
  """A batch of random ids with the stage's real layouts (packing functions of the data
  pipeline); stage2's gold is candidate 0. `lm` reads `prompt_len + answer_len` tokens."""

  def texts(n: int, length: int) -> List[List[int]]:
    return [list(rng.integers(4, base_vocab, length)) for _ in range(n)]

  if stage == "lm":
    length = prompt_len + answer_len
    return {
      "tokens": rng.integers(4, base_vocab, (batch, length)).astype(np.int32),
      "mask": np.ones((batch, length), np.int32),
    }
  n_mem = clara_cfg.n_mem
  mem = [tokenizer.mem_id(base_vocab, j) for j in range(n_mem)]
  enc, sep = base_vocab, base_vocab + 1
  docs = documents_per_question(stage, candidates, clara_cfg.k)
  slots_k = 1 if stage == "stage1" else clara_cfg.k
  # Rows as the data pipeline packs them: `<ENC><s> text </s>` in doc_len + 3, memories.
  doc_t, doc_m, _ = packing.pack_encoder(
    texts(batch * docs, doc_len), doc_len + packing.ENCODER_FRAME, mem, enc, 1, 2, 0
  )
  slots = packing.slot_ids(n_mem, slots_k, mem, sep)
  fill = prompt_len - len(slots) - 1
  prompts = [[1] + slots + list(rng.integers(4, base_vocab, fill)) for _ in range(batch)]
  gen, _ = packing.pack_generator(
    prompts, texts(batch, answer_len - 1), prompt_len, answer_len, mem, slots_k, 2, 0
  )
  out = {
    "doc_tokens": doc_t.reshape(batch, docs, -1),
    "doc_mask": doc_m.reshape(batch, docs, -1),
    **gen,
  }
  if stage == "stage2":
    q_t, q_m, _ = packing.pack_encoder(
      texts(batch, question_len), question_len + packing.ENCODER_FRAME, mem, enc, 1, 2, 0
    )
    positives = np.zeros((batch, candidates), np.int32)
    positives[:, 0] = 1
    out.update(q_tokens=q_t, q_mask=q_m, positives=positives)
  return out


def stage_config(
  stage: str = "stage2",
  model: str = "tiny",
  batch: int = 4,
  candidates: int = 20,
  doc_len: int = 128,
  compr_rate: int = 16,
  k: int = 5,
  question_len: int = 32,
  prompt_len: int = 169,
  answer_len: int = 20,
  dtype: Optional[str] = None,
  attention_layout: Optional[str] = None,
) -> ml_collections.ConfigDict:
  """The stage's config file (`configs/STAGE.py`) at the benchmark's shapes, on one
  device: what `train` would run for these lengths."""
  import importlib

  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
  config = importlib.import_module(f"configs.{stage}").get_config(f"model={model}")
  config.train.global_batch = batch
  config.clara.doc_max_length, config.clara.compr_rate, config.clara.k = doc_len, compr_rate, k
  config.data.candidates = candidates
  config.data.question_max_length = question_len
  config.data.prompt_length, config.data.answer_length = prompt_len, answer_len
  config.data.lm_length = prompt_len + answer_len
  # Special-token rows for exactly this n_mem, as a tokenizer built for it would have.
  config.tokenizer.num_mem_tokens = doc_len // compr_rate
  if dtype:
    config.model.dtype = dtype
  if attention_layout:
    config.model.attention_layout = attention_layout
  config.mesh.shape = (1, 1, 1)
  config.optimizer.schedule, config.optimizer.warmup_ratio = "constant", 0.0
  return config


def build_stage_step(
  config: ml_collections.ConfigDict,
  cached: bool = False,
  devices: Optional[Sequence[jax.Device]] = None,
) -> Tuple[TrainStepSetup, Callable[..., Any], Any, Dict[str, Any]]:
  """(setup, jitted step, its initial state, a batch) of `config`'s stage on `devices`
  (default: all, shaped by `config.mesh.shape`), set up by
  `train.setup.setup_train_step` as `train` and `plan` do; the state is donated, so
  each call takes the state the previous one returned."""
  if cached and config.stage != "stage2":
    raise ValueError("cached document memories are a stage2 option")
  cfg_m = stage_decoder_config(config)
  params = init_params(cfg_m, jax.random.key(config.seed))
  setup = setup_train_step(config, cfg_m, params, devices=devices)
  cfg_c = setup.cclara
  d = config.data
  data = synthetic_batch(
    config.stage,
    np.random.default_rng(0),
    cfg_m.base_vocab_size,
    config.train.global_batch,
    d.candidates,
    cfg_c.doc_max_length,
    d.question_max_length,
    d.prompt_length,
    d.answer_length,
    cfg_c,
  )
  if cached:
    mem = jax.jit(
      lambda p, t, m: clara.memories(Decoder(cfg_m), p, t, m, cfg_c.n_mem, clara.COMPRESSOR)
    )(params, data.pop("doc_tokens"), data.pop("doc_mask"))
    data["doc_mem"] = mem.reshape(config.train.global_batch, d.candidates, cfg_c.n_mem, -1)
  for name in features.truncation_counters(config.stage, cached):  # nothing truncated
    data[name] = np.zeros(config.train.global_batch, np.int32)
  state = create_state(params, setup.mask, setup.tx, config.seed)
  state_sh = setup.state_shardings(jax.eval_shape(lambda: state))
  batch_sh = setup.batch_shardings(data)
  with setup.context():
    step = setup.jit(state_sh, batch_sh)
  state = jax.device_put(state, state_sh)
  data = {key: jax.device_put(value, batch_sh[key]) for key, value in data.items()}
  return setup, step, state, data


def stage_step_time(
  stage: str = "stage2", model: str = "tiny", cached: bool = False, iters: int = 3, **options: Any
) -> dict:
  """Seconds per train step of `stage` (stage2: document memories recomputed, as the
  reference does, or `cached`), tokens/s and MFU against this process's matmul peak.
  `options`: `stage_config`'s shapes, `dtype` and `attention_layout`."""
  config = stage_config(stage, model, **options)
  setup, step, state, data = build_stage_step(config, cached, jax.devices()[:1])
  cfg_m, cfg_c = setup.cfg, setup.cclara
  holder = [state]

  def run() -> Any:
    with setup.context():
      holder[0], metrics = step(holder[0], data)
    return metrics

  seconds = time_fn(run, iters=iters)
  d, batch = config.data, config.train.global_batch
  docs = documents_per_question(stage, d.candidates, cfg_c.k)
  flops = step_flops(config, cfg_m, cfg_c, cached=cached)
  peak = matmul_peak_flops(dtype=jnp.dtype(cfg_m.dtype))
  tokens = batch * (d.prompt_length + d.answer_length)
  if stage != "lm" and not cached:
    tokens += batch * docs * packing.encoder_length(cfg_c.doc_max_length, cfg_c.n_mem)
  if stage == "stage2":
    tokens += batch * packing.encoder_length(d.question_max_length, cfg_c.n_mem)
  return {
    "benchmark": f"{stage}_step",
    "model": model,
    "dtype": cfg_m.dtype,
    "attention_layout": cfg_m.attention_layout,
    "cached_memories": cached,
    "batch": batch,
    "documents_per_question": docs,
    "k": cfg_c.k,
    "doc_len": cfg_c.doc_max_length,
    "compr_rate": cfg_c.compr_rate,
    "step_s": round(seconds, 4),
    "tokens_per_s": round(tokens / seconds, 1),
    "mfu": round(flops / seconds / peak, 4),
    "peak_gflops_per_s": round(peak / 1e9, 1),
  }
