"""Latency of answering a question end to end: compress its candidate documents,
reason over the question, select the top k, and decode the answer greedily."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.bench.stage_step import synthetic_batch
from clara_jax.data import packing, tokenizer
from clara_jax.infer.generate import generate, prefix_cache
from clara_jax.model import clara, stages
from clara_jax.model.config import DecoderConfig, model_config
from clara_jax.model.decoder import Decoder, init_params
from clara_jax.model.flops import DecoderPass, pass_flops
from clara_jax.train.peak import matmul_peak_flops, time_fn


def _prompts_after_head(
  rng: np.random.Generator,
  batch: int,
  vocab: int,
  head_len: int,
  prompt_len: int,
  n_mem: int,
  k: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Generator prompts of `prompt_len` tokens whose first `head_len` (the chat header and
  system text, shared by every question) are the same in every row: (head [head_len],
  the rows' rests as packed arrays (tokens, mask, slot positions) of prompt_len - head_len)."""
  mem = [tokenizer.mem_id(vocab, j) for j in range(n_mem)]
  slots = packing.slot_ids(n_mem, k, mem, vocab + 1)
  head = [1] + list(rng.integers(4, vocab, head_len - 1)) if head_len else []
  rest_len = prompt_len - head_len
  fill = rest_len - len(slots) - (0 if head_len else 1)
  if fill < 0:
    raise ValueError(
      f"prompt_len {prompt_len} cannot hold a head of {head_len} tokens and "
      f"{len(slots)} slot tokens"
    )
  rests = [
    ([] if head_len else [1]) + slots + list(rng.integers(4, vocab, fill)) for _ in range(batch)
  ]
  arrays, _ = packing.pack_generator(rests, [[]] * batch, rest_len, 1, mem, k, 2, 0)
  return (
    np.asarray(head, np.int32),
    arrays["gen_tokens"][:, :rest_len],
    arrays["gen_mask"][:, :rest_len],
    arrays["slot_positions"],
  )


def answer_flops(
  cfg: DecoderConfig,
  batch: int,
  candidates: int,
  doc_tokens: int,
  question_tokens: int,
  rest_len: int,
  new_tokens: int,
  n_mem: int,
) -> float:
  """Model FLOPs of answering `batch` questions: the folded compressor over every
  candidate and the reasoner (memory positions read out), the prompts' rests, and
  `new_tokens - 1` one-token decode steps through the LM head. Attention to the cache
  is counted only within each pass (not the prefix or earlier tokens), so this is a
  lower bound."""
  compress = pass_flops(
    cfg, DecoderPass(batch * candidates, doc_tokens, readout=n_mem, adapter=False)
  )
  reason = pass_flops(cfg, DecoderPass(batch, question_tokens, readout=n_mem))
  prefill = pass_flops(cfg, DecoderPass(batch, rest_len, head_tokens=batch))
  step = pass_flops(cfg, DecoderPass(batch, 1, head_tokens=batch))
  return compress + reason + prefill + (new_tokens - 1) * step


def generation_latency(
  model: str = "tiny",
  batch: int = 4,
  candidates: int = 20,
  doc_len: int = 128,
  compr_rate: int = 16,
  k: int = 5,
  question_len: int = 32,
  prompt_len: int = 169,
  head_len: int = 0,
  new_tokens: int = 20,
  iters: int = 3,
  dtype: Optional[str] = None,
) -> dict:
  """Milliseconds per question of each phase and of the four in one call, for `batch`
  questions at a time; the decoder runs all `new_tokens` steps (no eos id: every row
  decodes to the end). The first `head_len` prompt tokens are the same in every row;
  their keys and values are built once (as `ClaraModel` builds them once per model) and
  reported as `head_ms`, outside the per-question figures."""
  cfg_c = clara.ClaraConfig(doc_max_length=doc_len, compr_rate=compr_rate, k=k)
  overrides = {"dtype": dtype} if dtype else {}
  cfg_m = model_config(
    model, num_extra_tokens=tokenizer.num_special_tokens(cfg_c.n_mem), **overrides
  )
  params = init_params(cfg_m, jax.random.key(0))
  rng = np.random.default_rng(0)
  text_lengths = (doc_len, question_len, prompt_len)
  data = synthetic_batch(
    "stage2", rng, cfg_m.base_vocab_size, batch, candidates, *text_lengths, 2, cfg_c
  )
  head, *prompts = _prompts_after_head(
    rng, batch, cfg_m.base_vocab_size, head_len, prompt_len, cfg_c.n_mem, k
  )
  compress, reason, select = _retrieval_phases(Decoder(cfg_m), cfg_c.n_mem, k)
  start = time.perf_counter()
  prefix = jax.block_until_ready(prefix_cache(params, cfg_m, head)) if head_len else None
  head_s = time.perf_counter() - start  # includes its compile: a once-per-model cost
  decode = lambda picked: generate(
    params, cfg_m, *prompts, picked, max_new_tokens=new_tokens, eos_id=-1, prefix=prefix
  )
  phases, total = _time_phases(params, data, compress, reason, select, decode, iters)
  packed_lengths = (data["doc_tokens"].shape[-1], data["q_tokens"].shape[-1], prompts[0].shape[1])
  flops = answer_flops(cfg_m, batch, candidates, *packed_lengths, new_tokens, cfg_c.n_mem)
  return {
    "benchmark": "generation",
    "model": model,
    "dtype": cfg_m.dtype,
    "batch": batch,
    "candidates": candidates,
    "k": k,
    "doc_len": doc_len,
    "new_tokens": new_tokens,
    "prompt_len": prompt_len,
    "head_len": head_len,
    "head_ms": round(1e3 * head_s, 1),
    **_latencies(phases, total, batch, new_tokens, flops, jnp.dtype(cfg_m.dtype)),
  }


def _retrieval_phases(
  decoder: Decoder, n_mem: int, k: int
) -> Tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
  """The jitted phases before decoding: (compress, reason, select)."""
  # The frozen compressor's path of the stage2 step: adapter folded, candidates in chunks.
  compress = jax.jit(lambda p, t, m: stages.frozen_compress(decoder, p, t, m, n_mem))
  reason = jax.jit(lambda p, t, m: clara.reason(decoder, p, t, m, n_mem))

  @jax.jit
  def select(q_mem: jax.Array, doc_mem: jax.Array) -> jax.Array:
    _, indices = jax.lax.top_k(clara.score(q_mem, doc_mem), k)
    return jnp.take_along_axis(doc_mem, indices[:, :, None, None], axis=1)

  return compress, reason, select


def _time_phases(
  params: Any,
  data: Dict[str, Any],
  compress: Callable[..., Any],
  reason: Callable[..., Any],
  select: Callable[..., Any],
  decode: Callable[..., Any],
  iters: int,
) -> Tuple[Dict[str, float], float]:
  """(seconds of each phase, seconds of the four in one call) on the batch `data`."""
  doc_t, doc_m = data["doc_tokens"], data["doc_mask"]  # [B, N, L + n_mem]
  q_t, q_m = data["q_tokens"], data["q_mask"]

  def answer() -> Any:
    doc_mem = compress(params, doc_t, doc_m)
    return decode(select(reason(params, q_t, q_m), doc_mem))

  doc_mem = compress(params, doc_t, doc_m)
  q_mem = reason(params, q_t, q_m)
  picked = select(q_mem, doc_mem)
  phases = {
    "compress": time_fn(compress, params, doc_t, doc_m, iters=iters),
    "reason": time_fn(reason, params, q_t, q_m, iters=iters),
    "select": time_fn(select, q_mem, doc_mem, iters=iters),
    "decode": time_fn(decode, picked, iters=iters),
  }
  return phases, time_fn(answer, iters=iters)


def _latencies(
  phases: Dict[str, float], total: float, batch: int, new_tokens: int, flops: float, dtype: Any
) -> dict:
  """Per-question milliseconds, decode throughput and MFU of the timed phases."""
  peak = matmul_peak_flops(dtype=dtype)
  per_q = {f"{name}_ms_per_question": round(1e3 * s / batch, 3) for name, s in phases.items()}
  return {
    **per_q,
    "total_ms_per_question": round(1e3 * total / batch, 3),
    "decode_tokens_per_s": round(batch * new_tokens / phases["decode"], 1),
    "mfu": round(flops / total / peak, 4),
    "peak_gflops_per_s": round(peak / 1e9, 1),
  }
