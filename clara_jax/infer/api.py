"""A trained CLaRa as a Python object, mirroring the reference's entry points.

    model = ClaraModel.load("runs/stage2/export", doc_max_length=64, compr_rate=16)
    memories = model.compress_documents(["doc one", "doc two"])        # [N, n_mem, D]
    model.generate_from_paraphrase(["a document"])                      # stage1
    model.generate_from_documents(["question?"], [["d1", "d2", ...]])  # stage1_2
    answers, chosen = model.generate_from_questions(["q?"], [[20 docs]], k=5)  # stage2

Every call pads to shape buckets so repeated calls reuse compiled programs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from clara_jax import paths
from clara_jax.data import packing, templates
from clara_jax.data.tokenizer import ClaraTokenizer, load_tokenizer
from clara_jax.infer.generate import bucket_length, generate, prefix_cache
from clara_jax.model import clara, lora, stages
from clara_jax.model.config import DecoderConfig
from clara_jax.model.decoder import Decoder, KVCache
from clara_jax.weights.export import load_params


@dataclasses.dataclass
class Timings:
  """Accumulated milliseconds per phase (for per-question latency reports)."""

  compress_ms: float = 0.0
  query_ms: float = 0.0
  decode_ms: float = 0.0


@dataclasses.dataclass
class Truncations:
  """Texts cut to the encoder's length so far (each cut is also logged as it happens)."""

  documents: int = 0
  questions: int = 0


class ClaraModel:
  """Compressor, reasoner and generator of one exported checkpoint."""

  def __init__(
    self,
    cfg: DecoderConfig,
    params: Any,
    tokenizer: ClaraTokenizer,
    doc_max_length: int,
    compr_rate: int,
    question_max_length: int = 64,
    doc_batch: int = 32,
    prompt_style: str = "reference",
    memory_scale: str = "none",
  ) -> None:
    clara.check_memory_scale(memory_scale)
    self.cfg, self.params, self.tok = cfg, params, tokenizer
    self.prompt_style, self.memory_scale = prompt_style, memory_scale
    self.n_mem = clara.num_memory_tokens(doc_max_length, compr_rate)
    self.doc_max_length, self.question_max_length = doc_max_length, question_max_length
    self.doc_batch = doc_batch
    self.timings = Timings()
    self.truncations = Truncations()
    self.memory_cache = None  # see `use_memory_cache`
    # Keys and values of prompt heads (the tokens before the first memory slot, the same
    # for every question of a prompt style), each built once: {head tokens: KV cache}.
    self.reuse_prefix = True
    self._prefixes: Dict[Tuple[int, ...], KVCache] = {}
    model = Decoder(cfg)
    n_mem = self.n_mem
    # The compressor is frozen here: its adapter is folded into the base kernels (the
    # stage2 step's path), one matmul per projection instead of three.
    self._compress = jax.jit(lambda p, t, m: stages.frozen_memories(model, p, t, m, n_mem))
    self._reason = jax.jit(lambda p, t, m: clara.reason(model, p, t, m, n_mem))

    def nll_per_example(
      p: Any,
      tokens: jax.Array,
      mask: jax.Array,
      slots: jax.Array,
      memories: jax.Array,
      answer_mask: jax.Array,
    ) -> jax.Array:
      one = lambda t, m, s, mem, a: clara.generator_loss(
        model, p, t[None], m[None], s[None], mem[None], a[None], memory_scale=memory_scale
      )[0]
      return jax.vmap(one)(tokens, mask, slots, memories, answer_mask)

    self._answer_nll = jax.jit(nll_per_example)

  @classmethod
  def load(
    cls,
    export_dir: str,
    doc_max_length: Optional[int] = None,
    compr_rate: Optional[int] = None,
    dtype: Optional[str] = None,
    **kw: Any,
  ) -> "ClaraModel":
    """Loads an export; lengths default to those recorded by training (clara.json).
    `dtype` ("bfloat16", "float32") sets the compute dtype; parameters keep theirs."""
    recorded = {}
    clara_json = paths.join(export_dir, "clara.json")
    if paths.exists(clara_json):
      recorded = paths.read_json(clara_json)
    doc_max_length = doc_max_length or recorded.get("doc_max_length")
    compr_rate = compr_rate or recorded.get("compr_rate")
    if doc_max_length is None or compr_rate is None:
      raise ValueError(f"{export_dir}: no clara.json; pass doc_max_length and compr_rate")
    for key in ("question_max_length", "prompt_style", "memory_scale"):
      if key in recorded:
        kw.setdefault(key, recorded[key])
    cfg, params = load_params(export_dir)
    if dtype is not None:
      cfg = dataclasses.replace(cfg, dtype=dtype)
    tok_path = export_dir  # its tokenizer.model or tokenizer.json
    n_mem = clara.num_memory_tokens(doc_max_length, compr_rate)
    tok = load_tokenizer(tok_path, cfg.num_extra_tokens - 3)
    if tok.num_mem_tokens < n_mem:
      raise ValueError(
        f"{export_dir}: doc_max_length {doc_max_length} / compr_rate {compr_rate} need "
        f"{n_mem} memory tokens, but the export's tokenizer has {tok.num_mem_tokens} "
        f"(trained with doc_max_length {recorded.get('doc_max_length', '?')} / "
        f"compr_rate {recorded.get('compr_rate', '?')}: pass lengths that give at most "
        f"{tok.num_mem_tokens})"
      )
    return cls(cfg, params, tok, doc_max_length, compr_rate, **kw)

  # --- encoders -------------------------------------------------------------------
  def _encode_texts(
    self, texts: Sequence[str], max_len: int, kind: str
  ) -> Tuple[np.ndarray, np.ndarray]:
    ids = [self.tok.encode(t, parse_special=False) for t in texts]
    tokens, mask, cut = packing.pack_encoder(
      ids,
      max_len + packing.ENCODER_FRAME,
      self.tok.mem_ids[: self.n_mem],
      self.tok.enc_id,
      self.tok.bos_id,
      self.tok.eos_id,
      self.tok.pad_id,
    )
    if cut:
      # What the compressor or reasoner never saw changes its memories: say so.
      setattr(self.truncations, kind, getattr(self.truncations, kind) + cut)
      longest = max(len(i) for i in ids)
      logging.warning(
        "%d of %d %s are longer than %d tokens (the longest: %d) and were cut to fit",
        cut,
        len(ids),
        kind,
        max_len,
        longest,
      )
    return tokens, mask

  def _batched(
    self, fn: Callable[[Any, np.ndarray, np.ndarray], Any], tokens: np.ndarray, mask: np.ndarray
  ) -> np.ndarray:
    """Runs fn over fixed-size chunks (padded) so one compiled program serves all."""
    out, n, size = [], len(tokens), self.doc_batch
    for start in range(0, n, size):
      t, m = tokens[start : start + size], mask[start : start + size]
      pad = size - len(t)
      if pad:
        t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
        m = np.concatenate([m, np.repeat(m[-1:], pad, 0)])
      out.append(np.asarray(fn(self.params, t, m))[: size - pad])
    return np.concatenate(out) if out else np.zeros((0, self.n_mem, self.cfg.hidden_size))

  def use_memory_cache(self, cache: Any) -> "ClaraModel":
    """Reads documents' memories from `cache` (a `clara_jax.train.memory_cache.MemoryCache`
    built by this model's compressor: checked here) and compresses only the documents it
    lacks. Returns self."""
    cache.check(self.params, self.n_mem, self.doc_max_length, "this model")
    self.memory_cache = cache
    return self

  def compress_documents(self, texts: Sequence[str]) -> np.ndarray:
    """Documents -> memories [N, n_mem, D] (compressor adapter, or the memory cache)."""
    if self.memory_cache is not None:
      cached = self.memory_cache.rows(texts)
      missing = [i for i, row in enumerate(cached) if row is None]
      if len(missing) < len(texts):
        out = np.empty((len(texts),) + self.memory_cache.memories.shape[1:], np.float32)
        hits = [i for i, row in enumerate(cached) if row is not None]
        out[hits] = self.memory_cache.memories[[cached[i] for i in hits]]
        if missing:
          out[missing] = self._compress_texts([texts[i] for i in missing])
        return out
    return self._compress_texts(texts)

  def _compress_texts(self, texts: Sequence[str]) -> np.ndarray:
    mem, ms = self._timed_memories(self._compress, texts, self.doc_max_length, "documents")
    self.timings.compress_ms += ms
    return mem

  def reason(self, questions: Sequence[str]) -> np.ndarray:
    """Questions -> query memories [B, n_mem, D] (reasoner adapter)."""
    mem, ms = self._timed_memories(self._reason, questions, self.question_max_length, "questions")
    self.timings.query_ms += ms
    return mem

  def _timed_memories(
    self,
    fn: Callable[[Any, np.ndarray, np.ndarray], Any],
    texts: Sequence[str],
    max_length: int,
    what: str,
  ) -> Tuple[np.ndarray, float]:
    """(memories of `fn` over the texts' encoder rows, milliseconds taken)."""
    start = time.perf_counter()
    tokens, mask = self._encode_texts(texts, max_length, what)
    mem = self._batched(fn, tokens, mask)
    return mem, 1e3 * (time.perf_counter() - start)

  # --- generation -----------------------------------------------------------------
  def _split_head(self, prompts: List[List[int]]) -> Tuple[Optional[KVCache], List[List[int]]]:
    """(the KV cache of the tokens before the first memory slot, prompts without them)
    when every prompt has the same such tokens; else (None, prompts)."""
    first_slot = self.tok.mem_ids[0]
    if not self.reuse_prefix or first_slot not in prompts[0]:
      return None, prompts
    cut = prompts[0].index(first_slot)
    head = tuple(prompts[0][:cut])
    if cut == 0 or any(tuple(p[:cut]) != head for p in prompts):
      return None, prompts
    if head not in self._prefixes:
      if len(self._prefixes) >= 8:  # a few prompt styles in use; drop old ones
        self._prefixes.clear()
      self._prefixes[head] = prefix_cache(self.params, self.cfg, np.asarray(head, np.int32))
    return self._prefixes[head], [p[cut:] for p in prompts]

  def generate_turns(
    self, turns: List[Tuple[str, str]], memories: np.ndarray, k: int, max_new_tokens: int
  ) -> List[str]:
    """turns: (system, user) with k slots each; memories [B, k, n_mem, D]."""
    start = time.perf_counter()
    prompts = [self.tok.encode_prompt(user, system) for system, user in turns]
    prefix, prompts = self._split_head(prompts)
    length = bucket_length(max(len(p) for p in prompts))
    arrays, _ = packing.pack_generator(
      prompts,
      [[]] * len(prompts),
      length,
      1,
      self.tok.mem_ids[: self.n_mem],
      k,
      self.tok.eos_id,
      self.tok.pad_id,
    )
    b = len(prompts)
    padded_b = bucket_length(b, (1, 2, 4, 8, 16, 32, 64))

    def pad(x: np.ndarray) -> np.ndarray:
      return np.concatenate([x, np.repeat(x[-1:], padded_b - b, 0)]) if padded_b > b else x

    tokens, _ = generate(
      self.params,
      self.cfg,
      pad(arrays["gen_tokens"][:, :length]),
      pad(arrays["gen_mask"][:, :length]),
      pad(arrays["slot_positions"]),
      pad(np.asarray(memories)),
      max_new_tokens=max_new_tokens,
      eos_id=self.tok.eos_id,
      memory_scale=self.memory_scale,
      prefix=prefix,
    )
    tokens = np.asarray(tokens)[:b]
    out = []
    for row in tokens:
      row = row.tolist()
      if self.tok.eos_id in row:
        row = row[: row.index(self.tok.eos_id)]
      out.append(self.tok.decode(row, skip_special=True).strip())
    self.timings.decode_ms += 1e3 * (time.perf_counter() - start)
    return out

  def answer_nll(
    self, turns: List[Tuple[str, str]], answers: Sequence[str], memories: np.ndarray, k: int
  ) -> np.ndarray:
    """Teacher-forced answer loss: mean NLL (nats) per answer token (incl. eos) of each
    answer [B], given memories [B, k, n_mem, D] in the turns' k slots."""
    prompts = [self.tok.encode_prompt(user, system) for system, user in turns]
    answer_ids = [self.tok.encode(a, parse_special=False) for a in answers]
    length = bucket_length(max(len(p) for p in prompts))
    answer_len = bucket_length(max(len(a) for a in answer_ids) + 1, (8, 16, 32, 64, 128))
    arrays, _ = packing.pack_generator(
      prompts,
      answer_ids,
      length,
      answer_len,
      self.tok.mem_ids[: self.n_mem],
      k,
      self.tok.eos_id,
      self.tok.pad_id,
    )
    out = []
    for start in range(0, len(prompts), self.doc_batch):
      part = {key: v[start : start + self.doc_batch] for key, v in arrays.items()}
      b = len(part["gen_tokens"])
      pad = lambda x, b=b: (
        np.concatenate([x, np.repeat(x[-1:], self.doc_batch - b, 0)]) if b < self.doc_batch else x
      )
      nll = self._answer_nll(
        self.params,
        pad(part["gen_tokens"]),
        pad(part["gen_mask"]),
        pad(part["slot_positions"]),
        pad(np.asarray(memories[start : start + self.doc_batch])),
        pad(part["answer_mask"]),
      )
      out.append(np.asarray(nll)[:b])
    return np.concatenate(out)

  def generate_from_paraphrase(
    self, docs: Sequence[str], max_new_tokens: int = 64, instruction: int = 0
  ) -> List[str]:
    """stage1: reconstruct each document from its memories."""
    mem = self.compress_documents(docs)[:, None]
    slots = templates.memory_slots(self.n_mem, 1)
    user = templates.PARAPHRASE_INSTRUCTIONS[instruction].format(docs=slots)
    system = "" if self.prompt_style == "short" else templates.PARAPHRASE_SYSTEM
    return self.generate_turns([(system, user)] * len(docs), mem, 1, max_new_tokens)

  def generate_from_documents(
    self, questions: Sequence[str], docs: Sequence[Sequence[str]], max_new_tokens: int = 64
  ) -> List[str]:
    """stage1_2: answer each question from its given documents' memories."""
    k = len(docs[0])
    if any(len(d) != k for d in docs):
      raise ValueError("every question needs the same number of documents")
    mem = self.compress_documents([d for ds in docs for d in ds])
    mem = mem.reshape(len(questions), k, self.n_mem, -1)
    turns = [templates.answer_turn(q, self.n_mem, k, self.prompt_style) for q in questions]
    return self.generate_turns(turns, mem, k, max_new_tokens)

  def retrieve(
    self, questions: Sequence[str], doc_mem: np.ndarray, k: int
  ) -> Tuple[np.ndarray, np.ndarray]:
    """Reasoner top-k over candidate memories [B, N, n_mem, D]: (indices, scores)."""
    q_mem = self.reason(questions)
    scores = np.asarray(clara.score(jnp.asarray(q_mem), jnp.asarray(doc_mem)))
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return order, scores

  def generate_from_questions(
    self,
    questions: Sequence[str],
    candidates: Sequence[Sequence[str]],
    k: int = 5,
    max_new_tokens: int = 64,
  ) -> Tuple[List[str], np.ndarray]:
    """stage2: compress the candidates, retrieve k with the reasoner, answer.

    Returns (answers, chosen candidate indices [B, k], best first).
    """
    n = len(candidates[0])
    if any(len(c) != n for c in candidates):
      raise ValueError("every question needs the same number of candidates")
    doc_mem = self.compress_documents([d for c in candidates for d in c])
    doc_mem = doc_mem.reshape(len(questions), n, self.n_mem, -1)
    chosen, _ = self.retrieve(questions, doc_mem, k)
    selected = np.take_along_axis(doc_mem, chosen[:, :, None, None], axis=1)
    turns = [templates.answer_turn(q, self.n_mem, k, self.prompt_style) for q in questions]
    return self.generate_turns(turns, selected, k, max_new_tokens), chosen


def initial_reasoner(model: ClaraModel) -> ClaraModel:
  """The stage1_2 checkpoint with the reasoner set as stage2 starts it (a copy of the
  compressor): the baseline the evaluations compare the trained reasoner with."""
  params = lora.copy_adapter(model.params, "compressor", "reasoner")
  return ClaraModel(
    model.cfg,
    params,
    model.tok,
    model.doc_max_length,
    model.doc_max_length // model.n_mem,
    model.question_max_length,
    prompt_style=model.prompt_style,
    memory_scale=model.memory_scale,
  )
