"""A document-memory index: compress a corpus once, then retrieve by cosine for the
reasoner's query memories (built in, where the reference calls an external service).

On disk (`out_dir`): `shard_00000.npz` ... each holding `ids` and `memories`
[n, n_mem, H] (float16 by default), plus `index.json` written last. Building is
resumable: finished shards are kept and the build continues after the last one.
Searching shards the flattened, L2-normalised memory matrix over the devices along the
document axis, so a corpus need not fit on one device.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax import paths

INDEX_FILE = "index.json"


def _shard_path(out_dir: str, i: int) -> str:
  return paths.join(out_dir, f"shard_{i:05d}.npz")


def _read_npz(path: str):
  """A shard's arrays (`np.load` of its bytes: any store `paths` reads)."""
  return np.load(io.BytesIO(paths.read_bytes(path)))


def build_index(compress: Callable[[Sequence[str]], np.ndarray], docs: Sequence[Dict],
                out_dir: str, shard_size: int = 1024, dtype: str = "float16",
                progress: Optional[Callable[[int, int], None]] = None,
                inputs: Optional[Dict] = None) -> Dict:
  """Compresses `docs` ({"id", "text"}) shard by shard with `compress` (texts -> [n,
  n_mem, H]). Existing complete shards are reused, so an interrupted build resumes.

  `inputs`: what the shards are computed from (e.g. the export's and the corpus's
  fingerprints, `clara_jax.data.fingerprint`), recorded on the first build; a build into
  a directory recorded with other inputs raises `StaleArtefact` before touching it."""
  if shard_size < 1:
    raise ValueError(f"shard_size must be at least 1, got {shard_size}")
  if not docs:
    raise ValueError("no documents to index")  # an index of nothing cannot be loaded
  from clara_jax.data.formats import check_output_dir
  check_output_dir(out_dir)
  paths.makedirs(out_dir)
  if inputs is not None:
    from clara_jax.data import fingerprint
    fingerprint.check_or_record(
        paths.join(out_dir, "index" + fingerprint.FINGERPRINT_SUFFIX),
        dict(inputs, shard_size=shard_size, dtype=dtype), f"the index in {out_dir}")
  num_shards = -(-len(docs) // shard_size)
  for i in range(num_shards):
    path = _shard_path(out_dir, i)
    chunk = docs[i * shard_size:(i + 1) * shard_size]
    if paths.exists(path):
      with _read_npz(path) as done:
        if list(done["ids"]) == [str(d["id"]) for d in chunk]:
          continue
    memories = np.asarray(compress([d["text"] for d in chunk])).astype(dtype)
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.asarray([str(d["id"]) for d in chunk]), memories=memories)
    paths.write_atomic(path, [buffer.getvalue()])  # a shard is there whole or not at all
    if progress is not None:
      progress(i + 1, num_shards)
  meta = {"num_docs": len(docs), "num_shards": num_shards, "shard_size": shard_size,
          "dtype": dtype}
  paths.write_text(paths.join(out_dir, INDEX_FILE), json.dumps(meta))
  return meta


def read_shards(out_dir: str) -> Tuple[List[str], np.ndarray]:
  """(ids, memories [N, n_mem, H] as stored) of a finished build in `out_dir`."""
  path = paths.join(out_dir, INDEX_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(f"{path}: missing; the index build did not finish")
  meta = paths.read_json(path)
  ids, mems = [], []
  for i in range(meta["num_shards"]):
    with _read_npz(_shard_path(out_dir, i)) as shard:
      ids.extend(str(x) for x in shard["ids"])
      mems.append(shard["memories"])
  return ids, np.concatenate(mems)


class MemoryIndex:
  """The loaded index: ids and a normalised [N, n_mem * H] matrix sharded over devices."""

  def __init__(self, ids: List[str], memories: np.ndarray, mesh: Optional[Mesh] = None):
    self.ids = ids
    self.memories = memories  # host copy [N, n_mem, H], what the generator reads
    self.n_mem, self.hidden = memories.shape[1:]
    flat = memories.reshape(len(ids), -1).astype(np.float32)
    flat /= np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
    devices = np.asarray(jax.devices()) if mesh is None else mesh.devices.reshape(-1)
    mesh = Mesh(devices, ("docs",))
    pad = -len(ids) % len(devices)  # zero rows score 0 and are masked out below
    flat = np.concatenate([flat, np.zeros((pad, flat.shape[1]), np.float32)])
    self.matrix = jax.device_put(flat, NamedSharding(mesh, PartitionSpec("docs", None)))
    self.valid = jax.device_put(np.arange(len(flat)) < len(ids),
                                NamedSharding(mesh, PartitionSpec("docs")))

  @classmethod
  def load(cls, out_dir: str, mesh: Optional[Mesh] = None) -> "MemoryIndex":
    return cls(*read_shards(out_dir), mesh)

  def search(self, query_mem_bmh: np.ndarray, top_n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Cosine top-n for query memories [B, n_mem, H]: (doc indices [B, n], scores)."""
    scores, idx = _search(self.matrix, self.valid, jnp.asarray(query_mem_bmh, jnp.float32),
                          min(top_n, len(self.ids)))
    return np.asarray(idx), np.asarray(scores)


@functools.partial(jax.jit, static_argnames=("top_n",))
def _search(matrix, valid, query_bmh, top_n: int):
  q = query_bmh.reshape(query_bmh.shape[0], -1)
  q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  scores = q @ matrix.T
  scores = jnp.where(valid[None], scores, -jnp.inf)
  return jax.lax.top_k(scores, top_n)


def answer_from_index(model, index: MemoryIndex, questions: Sequence[str], k: int = 5,
                      max_new_tokens: int = 64):
  """Retrieves k documents per question from the index with the reasoner and answers
  from their stored memories. Returns (answers, [[doc ids]])."""
  from clara_jax.data import templates
  idx, _ = index.search(model.reason(questions), k)
  memories = index.memories[idx].astype(np.float32)  # [B, k, n_mem, H]
  turns = [templates.answer_turn(q, model.n_mem, idx.shape[1], model.prompt_style) for q in questions]
  answers = model.generate_turns(turns, memories, idx.shape[1], max_new_tokens)
  return answers, [[index.ids[j] for j in row] for row in idx]
