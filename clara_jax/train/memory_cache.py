"""Document memories of a frozen compressor, computed once and read by stage2 and the
evaluation instead of compressing every candidate again.

stage2 keeps the compressor frozen (the paper's setting), so a document's memory is the
same at every step and for every question it is a candidate of: with 20 candidates the
compressor pass is most of a stage2 step's work, and of an evaluation's. The cache is a
`clara_jax.infer.index` directory (resumable shards, float32 by default) whose ids are
`doc_key(text)`, plus the fingerprint of the parameters memories depend on
(`compressor_fingerprint`: the base, the compressor adapter and the extra embedding rows,
never the reasoner or generator adapters), so a stage2 run or a model whose compressor
differs is refused rather than fed another model's memories.

Shapes: D documents in the cache, N candidates per question, M = n_mem, H hidden.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, cast

import numpy as np

from clara_jax import paths
from clara_jax.model import clara, layout, lora

if TYPE_CHECKING:
  from clara_jax.infer.api import ClaraModel

CACHE_FILE = "memory_cache.json"


def doc_key(text: str) -> str:
  """The cache id of a document: the SHA-1 of its UTF-8 text."""
  return hashlib.sha1(text.encode("utf-8")).hexdigest()


def compressor_fingerprint(params: Any) -> str:
  """SHA-256 over every parameter a document's memory depends on (paths sorted, values
  as float32 bytes): all but the reasoner's and the generator's adapters. Read in the
  unrolled layout, so scanned and unrolled models of the same weights agree."""
  skip = tuple(f"/lora_{name}/" for name in (clara.REASONER, clara.GENERATOR))
  digest = hashlib.sha256()
  for path, value in sorted(lora.flatten(layout.to_unrolled(params)).items()):
    if any(part in f"/{path}/" for part in skip):
      continue
    digest.update(path.encode())
    digest.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
  return digest.hexdigest()


class StaleMemoryCache(ValueError):
  """The cache was computed by another compressor or at other lengths."""


def build_cache(
  model: ClaraModel,
  texts: Iterable[str],
  out_dir: str,
  shard_size: int = 512,
  dtype: str = "float32",
  progress: Optional[Callable[[int, int], None]] = None,
) -> Dict:
  """Compresses every distinct text of `texts` with `model` (a `ClaraModel`) into
  `out_dir`; resumes an interrupted build. Returns the cache record."""
  from clara_jax.infer.index import build_index

  docs = {doc_key(t): t for t in texts}
  record = {
    "compressor": compressor_fingerprint(model.params),
    "n_mem": model.n_mem,
    "doc_max_length": model.doc_max_length,
    "num_docs": len(docs),
  }
  path = paths.join(out_dir, CACHE_FILE)
  if paths.exists(path):
    previous = paths.read_json(path)
    if previous != record:
      raise StaleMemoryCache(
        f"{out_dir}: a memory cache of other documents or another "
        f"compressor is there; use another directory"
      )
    return record
  build_index(
    model.compress_documents,
    [{"id": k, "text": t} for k, t in docs.items()],
    out_dir,
    shard_size=shard_size,
    dtype=dtype,
    progress=progress,
    inputs={k: v for k, v in record.items() if k != "num_docs"},
  )
  paths.write_json(path, record)
  return record


class MemoryCache:
  """A finished cache in memory: `lookup(texts) -> [len(texts), n_mem, D]` float32."""

  def __init__(self, directory: str):
    from clara_jax.infer.index import read_shards

    path = paths.join(directory, CACHE_FILE)
    if not paths.exists(path):
      raise FileNotFoundError(
        f"{path}: missing; the memory cache in {directory} was not "
        f"built, or its build did not finish"
      )
    self.record = paths.read_json(path)
    ids, memories = read_shards(directory)
    self.directory = directory
    self.memories = memories.astype(np.float32)  # [documents, n_mem, D]
    self.row = {key: i for i, key in enumerate(ids)}

  @property
  def n_mem(self) -> int:
    return self.record["n_mem"]

  def check(self, params: Any, n_mem: int, doc_max_length: int, who: str) -> None:
    """Raises `StaleMemoryCache` unless `params` has the cache's compressor and the
    lengths match."""
    if (n_mem, doc_max_length) != (self.record["n_mem"], self.record["doc_max_length"]):
      raise StaleMemoryCache(
        f"{self.directory}: memories of {self.record['n_mem']} tokens from documents of "
        f"{self.record['doc_max_length']}, but {who} uses {n_mem} from {doc_max_length}"
      )
    if compressor_fingerprint(params) != self.record["compressor"]:
      raise StaleMemoryCache(
        f"{self.directory}: computed by another compressor than "
        f"{who}'s (its base, compressor adapter or extra embeddings "
        f"differ)"
      )

  def rows(self, texts: Sequence[str]) -> List[Optional[int]]:
    """Each text's row in `memories`, None where the cache lacks it."""
    return [self.row.get(doc_key(text)) for text in texts]

  def lookup(self, texts: Sequence[str]) -> np.ndarray:
    """Memories [len(texts), n_mem, D]; KeyError naming a document the cache lacks."""
    rows = self.rows(texts)
    for text, row in zip(texts, rows):
      if row is None:
        raise KeyError(
          f"{self.directory}: no memory for the document "
          f"{text[:60]!r}...; build the cache from the rows it serves"
        )
    return self.memories[cast(List[int], rows)]  # no None left: checked above
