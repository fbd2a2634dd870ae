"""Latency of answering a question end to end: compress its candidate documents,
reason over the question, select the top k, and decode the answer greedily."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.bench.flops import time_fn
from clara_jax.bench.stage_step import synthetic_batch
from clara_jax.infer.generate import generate
from clara_jax.model import clara, stages
from clara_jax.model.config import model_config
from clara_jax.model.decoder import Decoder, init_params


def generation_latency(model: str = "tiny", batch: int = 4, candidates: int = 20,
                       doc_len: int = 128, compr_rate: int = 16, k: int = 5,
                       question_len: int = 32, prompt_len: int = 169,
                       new_tokens: int = 20, iters: int = 3,
                       dtype: Optional[str] = None) -> dict:
  """Milliseconds per question of each phase, for `batch` questions at a time; the
  decoder runs all `new_tokens` steps (no eos id: every row decodes to the end)."""
  cfg_c = clara.ClaraConfig(doc_max_length=doc_len, compr_rate=compr_rate, k=k)
  overrides = {"dtype": dtype} if dtype else {}
  cfg_m = model_config(model, num_extra_tokens=3 + cfg_c.n_mem, **overrides)
  params = init_params(cfg_m, jax.random.key(0))
  data = synthetic_batch("stage2", np.random.default_rng(0), cfg_m.base_vocab_size, batch,
                         candidates, doc_len, question_len, prompt_len, 2, cfg_c)
  decoder, n_mem = Decoder(cfg_m), cfg_c.n_mem
  # The frozen compressor's path of the stage2 step: adapter folded, candidates in chunks.
  compress = jax.jit(lambda p, t, m: stages.frozen_compress(decoder, p, t, m, n_mem))
  reason = jax.jit(lambda p, t, m: clara.reason(decoder, p, t, m, n_mem))

  @jax.jit
  def select(q_mem, doc_mem):
    _, indices = jax.lax.top_k(clara.score(q_mem, doc_mem), k)
    return jnp.take_along_axis(doc_mem, indices[:, :, None, None], axis=1)

  doc_t, doc_m = data["doc_tokens"], data["doc_mask"]  # [B, N, L + n_mem]
  prompt_t = data["gen_tokens"][:, :prompt_len]
  prompt_m = data["gen_mask"][:, :prompt_len]
  doc_mem = compress(params, doc_t, doc_m)
  q_mem = reason(params, data["q_tokens"], data["q_mask"])
  picked = select(q_mem, doc_mem)
  decode = lambda: generate(params, cfg_m, prompt_t, prompt_m, data["slot_positions"],
                            picked, max_new_tokens=new_tokens, eos_id=-1)
  phases = {
      "compress": time_fn(compress, params, doc_t, doc_m, iters=iters),
      "reason": time_fn(reason, params, data["q_tokens"], data["q_mask"], iters=iters),
      "select": time_fn(select, q_mem, doc_mem, iters=iters),
      "decode": time_fn(decode, iters=iters),
  }
  per_q = {f"{name}_ms_per_question": round(1e3 * s / batch, 3) for name, s in phases.items()}
  total = sum(phases.values())
  return {"benchmark": "generation", "model": model, "dtype": cfg_m.dtype, "batch": batch,
          "candidates": candidates, "k": k, "doc_len": doc_len, "new_tokens": new_tokens,
          **per_q, "total_ms_per_question": round(1e3 * total / batch, 3),
          "decode_tokens_per_s": round(batch * new_tokens / phases["decode"], 1)}
