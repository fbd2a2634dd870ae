"""Time of one compiled training step (loss + gradients + Adam update) per stage, on
random token ids shaped like a real batch."""

from __future__ import annotations

import jax
import numpy as np

from clara_jax.bench.flops import forward_flops, matmul_peak_flops, time_fn
from clara_jax.data import packing
from clara_jax.model import clara, stages
from clara_jax.model.config import model_config
from clara_jax.model.decoder import Decoder, init_params
from clara_jax.train import optimizer
from clara_jax.train.state import create_state
from clara_jax.train.step import make_train_step


def synthetic_stage2_batch(rng: np.random.Generator, vocab: int, base_vocab: int,
                           batch: int, candidates: int, doc_len: int, question_len: int,
                           prompt_len: int, answer_len: int, clara_cfg: clara.ClaraConfig):
  """A stage2 batch of random ids with the real layouts; gold = candidate 0."""
  n_mem = clara_cfg.n_mem
  mem = list(range(base_vocab + 3, base_vocab + 3 + n_mem))
  enc, sep = base_vocab, base_vocab + 1
  texts = lambda n, length: [list(rng.integers(4, base_vocab, length)) for _ in range(n)]
  doc_t, doc_m, _ = packing.pack_encoder(texts(batch * candidates, doc_len - 3), doc_len,
                                         mem, enc, 1, 2, 0)
  q_t, q_m, _ = packing.pack_encoder(texts(batch, question_len - 3), question_len, mem,
                                     enc, 1, 2, 0)
  slots = packing.slot_ids(n_mem, clara_cfg.k, mem, sep)
  fill = prompt_len - len(slots) - 1
  prompts = [[1] + slots + list(rng.integers(4, base_vocab, fill)) for _ in range(batch)]
  gen, _ = packing.pack_generator(prompts, texts(batch, answer_len - 1), prompt_len,
                                  answer_len, mem, clara_cfg.k, 2, 0)
  positives = np.zeros((batch, candidates), np.int32)
  positives[:, 0] = 1
  return {"doc_tokens": doc_t.reshape(batch, candidates, -1),
          "doc_mask": doc_m.reshape(batch, candidates, -1), "q_tokens": q_t, "q_mask": q_m,
          "positives": positives, **gen}


def stage2_step_time(model: str = "tiny", batch: int = 4, candidates: int = 20,
                     doc_len: int = 128, compr_rate: int = 16, k: int = 5,
                     question_len: int = 32, prompt_len: int = 169, answer_len: int = 20,
                     cached: bool = False, iters: int = 3) -> dict:
  """Seconds per stage2 train step, with document memories recomputed or cached."""
  cfg_c = clara.ClaraConfig(doc_max_length=doc_len, compr_rate=compr_rate, k=k)
  cfg_m = model_config(model, num_extra_tokens=3 + cfg_c.n_mem)
  params = init_params(cfg_m, jax.random.key(0))
  data = synthetic_stage2_batch(np.random.default_rng(0), cfg_m.vocab_size,
                                cfg_m.base_vocab_size, batch, candidates, doc_len,
                                question_len, prompt_len, answer_len, cfg_c)
  if cached:
    mem, _ = jax.jit(lambda p, t, m: clara.compress(Decoder(cfg_m), p, t, m, cfg_c.n_mem))(
        params, data.pop("doc_tokens"), data.pop("doc_mask"))
    data["doc_mem"] = mem.reshape(batch, candidates, cfg_c.n_mem, -1)
  # The real train step: gradients of the trainable subset only, clip + AdamW.
  schedule = optimizer.learning_rate_schedule(1e-4, 100, "constant", warmup_ratio=0.0)
  tx = optimizer.make_optimizer(schedule)
  step = jax.jit(make_train_step(stages.stage_loss("stage2", cfg_m, cfg_c), tx, schedule))
  state = create_state(params, stages.trainable_mask("stage2", params, cfg_c), tx)
  seconds = time_fn(lambda: step(state, data), iters=iters)
  # FLOPs: frozen compressor forward (1x) unless cached; reasoner and generator
  # forward + backward (3x).
  rank = cfg_m.lora.rank if cfg_m.lora else 0
  flops = 3 * forward_flops(cfg_m, batch, question_len + cfg_c.n_mem, rank, head_tokens=0)
  flops += 3 * forward_flops(cfg_m, batch, prompt_len + answer_len, rank,
                             head_tokens=batch * answer_len)
  if not cached:
    flops += forward_flops(cfg_m, batch * candidates, doc_len + cfg_c.n_mem, rank,
                           head_tokens=0)
  peak = matmul_peak_flops()
  tokens = batch * (question_len + prompt_len + answer_len
                    + (0 if cached else candidates * doc_len))
  return {"benchmark": "stage2_step", "model": model, "cached_memories": cached,
          "batch": batch, "candidates": candidates, "k": k, "doc_len": doc_len,
          "compr_rate": compr_rate, "step_s": round(seconds, 4),
          "tokens_per_s": round(tokens / seconds, 1),
          "mfu": round(flops / seconds / peak, 4), "peak_gflops_per_s": round(peak / 1e9, 1)}
