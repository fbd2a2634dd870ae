"""A key-value retrieval world in raw token ids, for core CLaRa tests (no tokenizer).

Each document is `[key_i, value_i]`; a question is `[query_i]`, a token different from
`key_i` (so an untrained reasoner retrieves at chance), and its answer is `value_i`: the
answer can only come from reading the right document. Values are re-drawn for every batch
(`fresh=True`), so no model can memorise them: only reading the memories pays.
"""

import numpy as np

from clara_jax.data import packing
from clara_jax.model.config import model_config

BASE_VOCAB = 128
ENC, SEP, AE = BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2
PAD, BOS, EOS, INST = 0, 1, 2, 3
KEYS, VALUES, QUERIES = 10, 40, 80  # id offsets


def model_cfg(n_mem, **kw):
  return model_config("tiny", base_vocab_size=BASE_VOCAB, num_extra_tokens=3 + n_mem, **kw)


def mem_ids(n_mem):
  return [BASE_VOCAB + 3 + i for i in range(n_mem)]


class KVWorld:
  def __init__(self, n_entities=24, seed=0, fresh=True):
    self.rng = np.random.default_rng(seed)
    self.n = n_entities
    self.fresh = fresh
    self.values = self.rng.integers(0, 32, n_entities) + VALUES

  def _refresh(self, rng):
    if self.fresh:
      self.values = rng.integers(0, 32, self.n) + VALUES

  def docs(self, ids, clara_cfg):
    texts = [[KEYS + i, int(self.values[i])] for i in ids]
    tokens, mask, _ = packing.pack_encoder(
      texts, clara_cfg.doc_max_length, mem_ids(clara_cfg.n_mem), ENC, BOS, EOS, PAD
    )
    return tokens, mask

  def gen(self, answers, n_slots, clara_cfg, question=None):
    slots = packing.slot_ids(clara_cfg.n_mem, n_slots, mem_ids(clara_cfg.n_mem), SEP)
    prompts = [
      [BOS, INST] + slots + ([] if question is None else [QUERIES + question[i]]) + [INST]
      for i in range(len(answers))
    ]
    arrays, _ = packing.pack_generator(
      prompts,
      [[int(a)] for a in answers],
      prompt_len=len(prompts[0]),
      answer_len=2,
      mem_ids=mem_ids(clara_cfg.n_mem),
      n_slots=n_slots,
      eos_id=EOS,
      pad_id=PAD,
    )
    return arrays

  def stage1_batch(self, rng, batch, clara_cfg):
    self._refresh(rng)
    ids = rng.integers(0, self.n, batch)
    tokens, mask = self.docs(ids, clara_cfg)
    out = {"doc_tokens": tokens[:, None], "doc_mask": mask[:, None]}
    out.update(self.gen(self.values[ids], 1, clara_cfg))
    return out

  def stage2_batch(self, rng, batch, n_cand, clara_cfg, question_in_prompt=True):
    self._refresh(rng)
    cands = np.stack([rng.choice(self.n, n_cand, replace=False) for _ in range(batch)])
    gold_slot = rng.integers(0, n_cand, batch)
    gold = cands[np.arange(batch), gold_slot]
    tokens, mask = self.docs(cands.reshape(-1), clara_cfg)
    qtexts = [[QUERIES + int(g)] for g in gold]
    q_tokens, q_mask, _ = packing.pack_encoder(
      qtexts, 4, mem_ids(clara_cfg.n_mem), ENC, BOS, EOS, PAD
    )
    out = {
      "doc_tokens": tokens.reshape(batch, n_cand, -1),
      "doc_mask": mask.reshape(batch, n_cand, -1),
      "q_tokens": q_tokens,
      "q_mask": q_mask,
      "positives": (np.arange(n_cand)[None] == gold_slot[:, None]).astype(np.int32),
    }
    out.update(
      self.gen(
        self.values[gold], clara_cfg.k, clara_cfg, question=gold if question_in_prompt else None
      )
    )
    return out
