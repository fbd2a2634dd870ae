"""Normalised rows -> fixed-shape numpy examples for each stage (tokenise, template,
pack). Every example also carries truncation counters so the training loop can report
how much text the configured lengths cut.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from clara_jax.data import packing, templates
from clara_jax.data.tokenizer import ClaraTokenizer

Example = Dict[str, np.ndarray | np.generic]


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Static lengths of one stage's examples.

  Attributes:
    stage: lm | stage1 | stage1_2 | stage2 | stage2_retrieval.
    n_mem: memory tokens per document (doc_max_length // compr_rate).
    doc_max_length: document text tokens kept (the `<ENC><s>..</s>` block has 3 more).
    question_max_length: question text tokens kept for the reasoner (stage2).
    k: document slots in the generator prompt (stage1: 1; stage1_2: its documents).
    num_docs: documents per example (stage1: 1; stage1_2: k; stage2: candidates).
    prompt_length, answer_length: generator regions (see clara_jax.model.clara).
    lm_length: sequence length of the `lm` stage.
    prompt_style: generator prompt wording (see `templates.PROMPT_STYLES`).
  """

  stage: str
  n_mem: int = 4
  doc_max_length: int = 64
  question_max_length: int = 32
  k: int = 1
  num_docs: int = 1
  prompt_length: int = 64
  answer_length: int = 32
  lm_length: int = 128
  prompt_style: str = "reference"


class Featurizer:
  """Callable row -> example (numpy arrays), deterministic given (row, index, seed).

  `doc_memories` (stage2, stage2_retrieval): texts -> their precomputed memories
  [N, n_mem, D] (e.g. `clara_jax.train.memory_cache.MemoryCache.lookup`); the examples
  then carry `doc_mem` instead of the documents' tokens, and the step skips the
  compressor."""

  def __init__(
    self,
    tokenizer: ClaraTokenizer,
    cfg: FeatureConfig,
    seed: int = 0,
    doc_memories: Optional[Callable[[Sequence[str]], np.ndarray]] = None,
  ):
    if cfg.n_mem > tokenizer.num_mem_tokens:
      raise ValueError(
        f"n_mem={cfg.n_mem} but the tokenizer has only {tokenizer.num_mem_tokens} memory tokens"
      )
    if doc_memories is not None and cfg.stage not in ("stage2", "stage2_retrieval"):
      raise ValueError(
        f"precomputed document memories serve stage2 and stage2_retrieval, not {cfg.stage!r}"
      )
    self.tok, self.cfg, self.seed = tokenizer, cfg, seed
    self.doc_memories = doc_memories
    self.mem_ids = tokenizer.mem_ids[: cfg.n_mem]

  def _encoder(self, texts: Sequence[str], max_len: int) -> Tuple[np.ndarray, np.ndarray, int]:
    ids = [self.tok.encode(t, parse_special=False) for t in texts]
    tokens, mask, truncated = packing.pack_encoder(
      ids,
      max_len + packing.ENCODER_FRAME,
      self.mem_ids,
      self.tok.enc_id,
      self.tok.bos_id,
      self.tok.eos_id,
      self.tok.pad_id,
    )
    return tokens, mask, truncated

  def _generator(
    self, system: str, user: str, answer: str, k: int
  ) -> Tuple[Dict[str, np.ndarray], int]:
    prompt = self.tok.encode_prompt(user, system)
    answer_ids = self.tok.encode(answer, parse_special=False)
    arrays, truncated = packing.pack_generator(
      [prompt],
      [answer_ids],
      self.cfg.prompt_length,
      self.cfg.answer_length,
      self.mem_ids,
      k,
      self.tok.eos_id,
      self.tok.pad_id,
    )
    return {key: value[0] for key, value in arrays.items()}, truncated

  def _docs(self, docs: List[str], example: Example) -> None:
    if len(docs) != self.cfg.num_docs:
      raise ValueError(f"expected {self.cfg.num_docs} documents, found {len(docs)}")
    if self.doc_memories is not None:
      example["doc_mem"] = np.asarray(self.doc_memories(docs), np.float32)
      return
    tokens, mask, truncated = self._encoder(docs, self.cfg.doc_max_length)
    example.update(doc_tokens=tokens, doc_mask=mask, truncated_docs=np.int32(truncated))

  def __call__(self, row: Dict, index: int = 0) -> Example:
    cfg = self.cfg
    if cfg.stage == "lm":
      text = row["text"] if "text" in row else " ".join(row["docs"])
      ids = self.tok.encode(text, add_bos=True, add_eos=True, parse_special=False)
      tokens = np.full(cfg.lm_length, self.tok.pad_id, np.int32)
      kept = ids[: cfg.lm_length]
      tokens[: len(kept)] = kept
      return {
        "tokens": tokens,
        "mask": (np.arange(cfg.lm_length) < len(kept)).astype(np.int32),
        "truncated_lm": np.int32(len(ids) > cfg.lm_length),
      }
    example: Example = {}
    if cfg.stage == "stage1":
      self._docs(row["docs"], example)
      rng = np.random.default_rng([self.seed, index])
      system, user, answer = templates.stage1_turn(row, cfg.n_mem, rng, cfg.prompt_style)
      gen, truncated = self._generator(system, user, answer, 1)
    else:
      self._docs(row["docs"], example)
      system, user = templates.answer_turn(row["question"], cfg.n_mem, cfg.k, cfg.prompt_style)
      gen, truncated = self._generator(system, user, row["answer"], cfg.k)
    example.update(gen)
    example["truncated_gen"] = np.int32(truncated)
    if cfg.stage in ("stage2", "stage2_retrieval"):
      q_tokens, q_mask, q_truncated = self._encoder([row["question"]], cfg.question_max_length)
      positives = np.zeros(cfg.num_docs, np.int32)
      positives[list(row.get("pos_index", []))] = 1
      example.update(
        q_tokens=q_tokens[0],
        q_mask=q_mask[0],
        positives=positives,
        truncated_question=np.int32(q_truncated),
      )
    return example


def truncation_counters(stage: str, cached: bool = False) -> Tuple[str, ...]:
  """The `truncated_*` counters (int32 per example) a stage's examples carry; `cached`:
  the documents come as memories from a cache (no document tokens to truncate)."""
  if stage == "lm":
    return ("truncated_lm",)
  names: Tuple[str, ...] = () if cached else ("truncated_docs",)
  names += ("truncated_gen",)
  if stage in ("stage2", "stage2_retrieval"):
    names += ("truncated_question",)
  return names


def truncation_counts(batch: Example) -> Dict[str, int]:
  """Sums of a batch's `truncated_*` counters (what the loop reports)."""
  return {key: int(np.sum(value)) for key, value in batch.items() if key.startswith("truncated_")}


class ReplayFeaturizer:
  """A stage's featurizer whose every example also carries one line of replay text as
  LM tokens (`replay_tokens`, `replay_mask`: the `lm` stage's features), line `index`
  modulo the number of lines: the text a stage that updates the base keeps learning
  (`stages.with_replay`)."""

  def __init__(self, inner: Featurizer, lines: Sequence[str], lm: Featurizer):
    if not lines:
      raise ValueError("replay text has no lines")
    if lm.cfg.stage != "lm":
      raise ValueError(f"the replay featurizer must be the lm stage's, got {lm.cfg.stage!r}")
    self.inner, self.lines, self.lm = inner, list(lines), lm

  def __call__(self, row: Dict, index: int = 0) -> Example:
    example = self.inner(row, index)
    replay = self.lm({"text": self.lines[index % len(self.lines)]}, index)
    example["replay_tokens"], example["replay_mask"] = replay["tokens"], replay["mask"]
    return example
