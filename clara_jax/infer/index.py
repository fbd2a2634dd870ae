"""A document-memory index: compress a corpus once, then retrieve by cosine for the
reasoner's query memories (built in, where the reference calls an external service).

On disk (`out_dir`): `shard_00000.npz` ... each holding `ids` and `memories` [n, n_mem, D]
in the storage dtype, plus `index.json` written last (the dtype, n_mem, D and the bytes a
document takes). Building is resumable: finished shards are kept and the build
continues after the last one. Storage dtypes (STORAGE_DTYPES):

* float32, float16 (the default, so indexes built before the choice existed load as
  they were), bfloat16: the values; numpy has no bfloat16, so its shards hold the
  uint16 bit patterns (`memories`) and index.json names the dtype.
* int8: symmetric per-vector quantization, one float32 scale per memory vector (per
  [doc, mem] row of H values): q = round(x * 127 / max|x|), x ~ q * scale, with
  `scales` [n, n_mem] beside `memories` in each shard. An element's error is at most
  scale / 2 = max|x| / 254 of its vector.

Loaded (`MemoryIndex.load`), the stored values are placed on the devices, sharded along
the document axis over a 1-D mesh (each device holds a contiguous slice of rows, read
from the shards that cover it, never the whole corpus on the host), int8 with its
scales, with the inverse norm of every document's dequantized memory computed once, so
cosine is exact for the stored values. A search scores each device's slice block by
block (`shard_map`), takes the slice's top N (exact, or `lax.approx_max_k`), and merges
the devices' candidates with one more top N.

Shapes (the letters of `clara_jax.model`): N documents of the index, n_mem memory
vectors of D values each (E = n_mem * D flattened), B questions, k results per question,
R rows per device (the documents are sharded over the devices by rows).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clara_jax import paths

if TYPE_CHECKING:
  from clara_jax.infer.api import ClaraModel

try:
  from jax import shard_map as _shard_map
except ImportError:  # jax before shard_map left jax.experimental
  from jax.experimental.shard_map import shard_map as _shard_map  # type: ignore[no-redef]

INDEX_FILE = "index.json"
STORAGE_DTYPES = ("float16", "bfloat16", "float32", "int8")
DEFAULT_DTYPE = "float16"
AXIS = "docs"
# Bytes of one dequantized float32 block of rows scored at a time: it stays in a CPU
# core's cache between the conversion and the matmul (on 100 k documents of 1024 values
# over 8 CPU devices, blocks of 64 rows searched ~5% faster than 128 and ~20% faster
# than 1024).
BLOCK_BYTES = 1 << 18

_VALUE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_SCALE_BYTES = 4  # one float32 per int8 vector


def check_dtype(dtype: str) -> str:
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"index dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
  return dtype


def bytes_per_doc(n_mem: int, hidden: int, dtype: str) -> int:
  """Bytes a document's memories take in `dtype`: values, plus int8's scales."""
  check_dtype(dtype)
  scales = n_mem * _SCALE_BYTES if dtype == "int8" else 0
  return n_mem * hidden * _VALUE_BYTES[dtype] + scales


def quantize_int8(x_nmd: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-vector symmetric int8: (q [N, n_mem, D] int8, scales [N, n_mem] float32) with
  x ~ q * scales[..., None]; an all-zero vector gets scale 0."""
  x = np.asarray(x_nmd, np.float32)
  scales = np.abs(x).max(axis=-1) / 127.0
  safe = np.where(scales > 0, scales, 1.0)
  q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
  return q, scales.astype(np.float32)


def encode(x_nmd: np.ndarray, dtype: str) -> Dict[str, np.ndarray]:
  """Memories [N, n_mem, D] as a shard stores them: {"memories"} (+ {"scales"} for int8)."""
  check_dtype(dtype)
  if dtype == "int8":
    q, scales = quantize_int8(x_nmd)
    return {"memories": q, "scales": scales}
  if dtype == "bfloat16":
    values = np.asarray(x_nmd, np.float32).astype(ml_dtypes.bfloat16)
    return {"memories": values.view(np.uint16)}
  return {"memories": np.asarray(x_nmd).astype(dtype)}


def decode(stored: Dict[str, np.ndarray], dtype: str) -> np.ndarray:
  """The values [N, n_mem, D] a shard stores: float32/float16 as stored, bfloat16 as
  `ml_dtypes.bfloat16`, int8 dequantized to float32."""
  values = stored["memories"]
  if dtype == "int8":
    return values.astype(np.float32) * stored["scales"][..., None]
  if dtype == "bfloat16":
    return values.view(ml_dtypes.bfloat16)
  return values


def _shard_path(out_dir: str, i: int) -> str:
  return paths.join(out_dir, f"shard_{i:05d}.npz")


def _read_npz(path: str) -> np.lib.npyio.NpzFile:
  """A shard's arrays (`np.load` of its bytes: any store `paths` reads)."""
  return np.load(io.BytesIO(paths.read_bytes(path)))


def _matches(
  shard: np.lib.npyio.NpzFile, ids: List[str], dtype: str, shape: Tuple[int, ...]
) -> bool:
  """Whether a finished shard holds these ids in this storage (a build into a directory
  of another dtype recomputes rather than mixing two)."""
  if list(shard["ids"]) != ids:
    return False
  want = {"bfloat16": np.uint16}.get(dtype, dtype)
  memories = shard["memories"]
  if memories.dtype != np.dtype(want) or (shape and memories.shape[1:] != shape):
    return False
  return ("scales" in shard.files) == (dtype == "int8")


def _open_out_dir(out_dir: str, inputs: Optional[Dict], shard_size: int, dtype: str) -> None:
  """Creates the index directory (refusing a file), checking or recording the build's
  `inputs` there."""
  from clara_jax.data.formats import check_output_dir

  check_output_dir(out_dir)
  paths.makedirs(out_dir)
  if inputs is not None:
    from clara_jax.data import fingerprint

    fingerprint.check_or_record(
      paths.join(out_dir, "index" + fingerprint.FINGERPRINT_SUFFIX),
      dict(inputs, shard_size=shard_size, dtype=dtype),
      f"the index in {out_dir}",
    )


def _write_shard(
  path: str,
  compress: Callable[[Sequence[str]], np.ndarray],
  chunk: Sequence[Dict],
  ids: List[str],
  dtype: str,
) -> Tuple[int, ...]:
  """Compresses the documents of one shard and writes it; returns its memories' (n_mem, D)."""
  memories = np.asarray(compress([d["text"] for d in chunk]))
  if memories.ndim != 3 or len(memories) != len(chunk):
    raise ValueError(
      f"compress returned shape {memories.shape} for {len(chunk)} "
      "documents; expected [n, n_mem, hidden]"
    )
  buffer = io.BytesIO()
  # numpy's stub types **kwds as possibly `allow_pickle: bool`.
  np.savez(buffer, ids=np.asarray(ids), **encode(memories, dtype))  # type: ignore[arg-type]
  paths.write_atomic(path, [buffer.getvalue()])  # a shard is there whole or not at all
  return memories.shape[1:]


def build_index(
  compress: Callable[[Sequence[str]], np.ndarray],
  docs: Sequence[Dict],
  out_dir: str,
  shard_size: int = 1024,
  dtype: str = DEFAULT_DTYPE,
  progress: Optional[Callable[[int, int], None]] = None,
  inputs: Optional[Dict] = None,
) -> Dict:
  """Compresses `docs` ({"id", "text"}) shard by shard with `compress` (texts -> [n,
  n_mem, D]) and stores them in `dtype` (STORAGE_DTYPES). Existing complete shards are
  reused, so an interrupted build resumes.

  `inputs`: what the shards are computed from (e.g. the export's and the corpus's
  fingerprints, `clara_jax.data.fingerprint`), recorded on the first build; a build into
  a directory recorded with other inputs raises `StaleArtefact` before touching it.
  Returns index.json's record."""
  check_dtype(dtype)
  if shard_size < 1:
    raise ValueError(f"shard_size must be at least 1, got {shard_size}")
  if not docs:
    raise ValueError("no documents to index")  # an index of nothing cannot be loaded
  _open_out_dir(out_dir, inputs, shard_size, dtype)
  num_shards = -(-len(docs) // shard_size)
  shape: Tuple[int, ...] = ()  # (n_mem, D), from the first shard seen
  for i in range(num_shards):
    path = _shard_path(out_dir, i)
    chunk = docs[i * shard_size : (i + 1) * shard_size]
    ids = [str(d["id"]) for d in chunk]
    if paths.exists(path):
      with _read_npz(path) as done:
        if _matches(done, ids, dtype, shape):
          shape = done["memories"].shape[1:]
          continue
    shape = _write_shard(path, compress, chunk, ids, dtype)
    if progress is not None:
      progress(i + 1, num_shards)
  n_mem, hidden = (int(s) for s in shape)
  meta = {
    "num_docs": len(docs),
    "num_shards": num_shards,
    "shard_size": shard_size,
    "dtype": dtype,
    "n_mem": n_mem,
    "hidden": hidden,
    "bytes_per_doc": bytes_per_doc(n_mem, hidden, dtype),
  }
  paths.write_text(paths.join(out_dir, INDEX_FILE), json.dumps(meta))
  return meta


def read_meta(out_dir: str) -> Dict:
  """index.json of a finished build, completed for indexes written before it recorded
  the shape (read from the first shard); FileNotFoundError when the build did not
  finish."""
  path = paths.join(out_dir, INDEX_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(
      f"{path}: missing; the index build did not finish (or {out_dir} is not an index)"
    )
  meta = paths.read_json(path)
  if "n_mem" not in meta or "dtype" not in meta:
    with _read_npz(_shard_path(out_dir, 0)) as shard:
      memories = shard["memories"]
      meta.setdefault("dtype", str(memories.dtype))
      meta["n_mem"], meta["hidden"] = (int(s) for s in memories.shape[1:])
  check_dtype(meta["dtype"])
  meta.setdefault("bytes_per_doc", bytes_per_doc(meta["n_mem"], meta["hidden"], meta["dtype"]))
  return meta


def _stored_shard(
  out_dir: str, i: int, dtype: str
) -> Tuple[List[str], np.ndarray, Optional[np.ndarray]]:
  """(ids, stored values [n, E], scales [n, n_mem] float32 or None) of shard i."""
  with _read_npz(_shard_path(out_dir, i)) as shard:
    ids = [str(x) for x in shard["ids"]]
    memories = shard["memories"]
    scales = shard["scales"] if dtype == "int8" else None
  return ids, memories.reshape(len(memories), -1), scales


def read_shards(out_dir: str) -> Tuple[List[str], np.ndarray]:
  """(ids, memories [N, n_mem, D]) of a finished build in `out_dir`, on the host: values as
  `decode` gives them (int8 dequantized to float32)."""
  meta = read_meta(out_dir)
  ids: List[str] = []
  mems = []
  for i in range(meta["num_shards"]):
    with _read_npz(_shard_path(out_dir, i)) as shard:
      ids.extend(str(x) for x in shard["ids"])
      mems.append(decode({k: shard[k] for k in shard.files}, meta["dtype"]))
  return ids, np.concatenate(mems)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The static layout of a loaded index (hashable: a jit static argument)."""

  mesh: Mesh
  num_docs: int
  n_mem: int
  hidden: int
  dtype: str
  rows_per_device: int  # R, a multiple of block
  block: int  # rows dequantized and scored at a time

  @property
  def dim(self) -> int:
    return self.n_mem * self.hidden

  @property
  def cpu(self) -> bool:
    return self.mesh.devices.flat[0].platform == "cpu"


def _layout(num_docs: int, devices: int, dim: int, block: Optional[int]) -> Tuple[int, int]:
  """(rows per device R, block) with R a multiple of block and R * devices >= N."""
  per = -(-num_docs // devices)
  block = block or max(8, BLOCK_BYTES // (4 * dim))
  block = max(1, min(block, per))
  return -(-per // block) * block, block


class MemoryIndex:
  """A loaded index: its ids and the stored memories on the devices.

  `matrix` [devices * R, E] holds the stored values (float32, float16, int8, or bfloat16's
  uint16 bit patterns: XLA:CPU converts bfloat16 arrays elementwise several times slower
  than the 16-bit shift that widens the bits exactly), `scales` [devices * R, n_mem] float32 for
  int8 (else None), `inv_norms` [devices * R] the inverse L2 norm of each document's
  dequantized flattened memory; all sharded along rows. Rows past N are zero padding,
  never returned."""

  def __init__(self, ids: List[str], spec: _Spec, matrix: jax.Array, scales: Optional[jax.Array]):
    self.ids = ids
    self.spec = spec
    self.n_mem, self.hidden, self.dtype = spec.n_mem, spec.hidden, spec.dtype
    self.matrix, self.scales = matrix, scales
    self.inv_norms = _inverse_norms(matrix, scales, spec=spec)

  @property
  def num_docs(self) -> int:
    return self.spec.num_docs

  @property
  def bytes_per_doc(self) -> int:
    return bytes_per_doc(self.n_mem, self.hidden, self.dtype)

  @classmethod
  def load(
    cls, out_dir: str, mesh: Optional[Mesh] = None, block: Optional[int] = None
  ) -> "MemoryIndex":
    """Places the index in `out_dir` on `mesh`'s devices (default: all devices), each
    device's rows read from the shards that hold them."""
    meta = read_meta(out_dir)
    dtype, size = meta["dtype"], meta["shard_size"]
    cache: Dict[int, tuple] = {}
    ids: Dict[int, List[str]] = {}

    def shard(i: int) -> tuple:
      if i not in cache:
        cache.clear()  # devices are filled in row order: one shard is enough to keep
        cache[i] = _stored_shard(out_dir, i, dtype)
        ids[i] = cache[i][0]
      return cache[i]

    def ids_of(i: int) -> List[str]:
      if i not in ids:  # a shard no local device holds (other processes' rows)
        with _read_npz(_shard_path(out_dir, i)) as npz:
          ids[i] = [str(x) for x in npz["ids"]]
      return ids[i]

    return cls._place(
      meta["num_docs"],
      meta["n_mem"],
      meta["hidden"],
      dtype,
      size,
      meta["num_shards"],
      shard,
      ids_of,
      mesh,
      block,
    )

  @classmethod
  def from_memories(
    cls,
    ids: Sequence[str],
    memories_nmd: np.ndarray,
    dtype: str = "float32",
    mesh: Optional[Mesh] = None,
    block: Optional[int] = None,
  ) -> "MemoryIndex":
    """An index of host memories [N, n_mem, D] stored in `dtype`, without files (tests,
    benchmarks)."""
    ids = [str(i) for i in ids]
    if memories_nmd.ndim != 3 or len(memories_nmd) != len(ids) or not ids:
      raise ValueError(
        f"expected memories [N, n_mem, D] for {len(ids)} ids, got shape {memories_nmd.shape}"
      )
    stored = encode(memories_nmd, dtype)
    values = stored["memories"].reshape(len(ids), -1)
    one = (ids, values, stored.get("scales"))
    n, n_mem, hidden = memories_nmd.shape
    return cls._place(n, n_mem, hidden, dtype, n, 1, lambda i: one, lambda i: ids, mesh, block)

  @classmethod
  def _place(
    cls,
    num_docs: int,
    n_mem: int,
    hidden: int,
    dtype: str,
    shard_size: int,
    num_shards: int,
    shard: Callable[[int], tuple],
    ids_of: Callable[[int], Sequence[str]],
    mesh: Optional[Mesh],
    block: Optional[int],
  ) -> "MemoryIndex":
    """Builds each local device's [R, E] rows from `shard(i)` = (ids, stored [n, E],
    scales [n, n_mem] or None), the file shards of `shard_size` rows, in row order."""
    check_dtype(dtype)
    devices = (np.asarray(jax.devices()) if mesh is None else mesh.devices).reshape(-1)
    mesh = Mesh(devices, (AXIS,))
    dim = n_mem * hidden
    per, block = _layout(num_docs, len(devices), dim, block)
    spec = _Spec(mesh, num_docs, n_mem, hidden, dtype, per, block)
    total = per * len(devices)
    stored_dtype = {"bfloat16": np.uint16}.get(dtype, dtype)
    rows_sharding = NamedSharding(mesh, PartitionSpec(AXIS, None))
    placed = sorted(
      (cast(Tuple[slice, ...], index)[0].start or 0, device)  # row-sharded: never None
      for device, index in rows_sharding.addressable_devices_indices_map((total, dim)).items()
    )
    values, scales = [], []
    for start, device in placed:
      buffer = np.zeros((per, dim), stored_dtype)
      scale = np.zeros((per, n_mem), np.float32) if dtype == "int8" else None
      stop = max(start, min(start + per, num_docs))  # a device past N holds padding
      for i in range(start // shard_size, -(-stop // shard_size)):
        _, rows, row_scales = shard(i)
        lo, hi = max(start, i * shard_size), min(stop, (i + 1) * shard_size)
        take = slice(lo - i * shard_size, hi - i * shard_size)
        if rows.shape[1] != dim:
          raise ValueError(
            f"shard {i} holds memories of {rows.shape[1]} values, the index {n_mem} x {hidden}"
          )
        buffer[lo - start : hi - start] = rows[take]
        if scale is not None:
          scale[lo - start : hi - start] = row_scales[take]
      values.append(jax.device_put(buffer, device))
      if scale is not None:
        scales.append(jax.device_put(scale, device))
    ids = [x for i in range(num_shards) for x in ids_of(i)]
    if len(ids) != num_docs:
      raise ValueError(f"the index's shards hold {len(ids)} ids, index.json {num_docs}")
    matrix = jax.make_array_from_single_device_arrays((total, dim), rows_sharding, values)
    scale_array = None
    if dtype == "int8":
      scale_array = jax.make_array_from_single_device_arrays((total, n_mem), rows_sharding, scales)
    return cls(ids, spec, matrix, scale_array)

  def search(
    self, query_mem_bmd: np.ndarray, top_n: int, approx: bool = False, recall_target: float = 0.95
  ) -> Tuple[np.ndarray, np.ndarray]:
    """Cosine top-n for query memories [B, n_mem, D]: (doc indices [B, n], scores [B, n]),
    best first. `approx`: each device's top-n by `lax.approx_max_k` at `recall_target`
    (fast on TPU; elsewhere it is exact)."""
    if top_n < 1:
      raise ValueError(f"top_n must be at least 1, got {top_n}")
    q = np.asarray(query_mem_bmd, np.float32)
    if q.ndim != 3 or q.shape[1:] != (self.n_mem, self.hidden):
      raise ValueError(
        f"query memories of shape {q.shape}; this index holds [N, {self.n_mem}, {self.hidden}]"
      )
    b = len(q)
    padded = 1 << max(b - 1, 0).bit_length()  # one program per power-of-two batch
    q = np.concatenate([q, np.zeros((padded - b,) + q.shape[1:], np.float32)])
    scores, idx = _search(
      self.matrix,
      self.scales,
      self.inv_norms,
      q,
      spec=self.spec,
      top_n=min(top_n, self.num_docs),
      approx=approx,
      recall_target=float(recall_target),
    )
    return np.asarray(idx)[:b], np.asarray(scores)[:b]

  def memories(self, idx_bk: np.ndarray) -> np.ndarray:
    """The memories of documents [B, k] (indices from `search`), dequantized: [B, k,
    n_mem, D] float32, gathered from the devices holding them."""
    idx = np.asarray(idx_bk, np.int32)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_docs):
      raise IndexError(f"document indices must be in [0, {self.num_docs})")
    return np.asarray(_gather(self.matrix, self.scales, idx, spec=self.spec))

  def values(self) -> np.ndarray:
    """Every document's dequantized memories [N, n_mem, D] float32 on the host: a full copy,
    for tests and small indexes."""
    return self.memories(np.arange(self.num_docs)[None])[0]


def _dequantize(rows_re: jax.Array, scales_rm: Optional[jax.Array], spec: _Spec) -> jax.Array:
  """Stored rows [r, D] -> float32 [r, D]."""
  if spec.dtype == "bfloat16":
    wide = lax.shift_left(rows_re.astype(jnp.uint32), jnp.uint32(16))
    values = lax.bitcast_convert_type(wide, jnp.float32)
  else:
    values = rows_re.astype(jnp.float32)
  if spec.dtype == "int8":
    assert scales_rm is not None  # an int8 index always has scales
    r = rows_re.shape[0]
    values = (values.reshape(r, spec.n_mem, spec.hidden) * scales_rm[:, :, None]).reshape(
      r, spec.dim
    )
  return values


def _blocks(
  fn: Callable[[jax.Array], jax.Array],
  matrix_re: jax.Array,
  scales_rm: Optional[jax.Array],
  spec: _Spec,
) -> jax.Array:
  """fn(float32 block [block, E]) over a device's rows, block by block: [R / block, ...]
  stacked. The block is materialised (an optimisation barrier on CPU), since XLA:CPU
  fusing the conversion into the matmul is several times slower than the matmul."""
  blocks = spec.rows_per_device // spec.block

  def one(args: Tuple[jax.Array, Optional[jax.Array]]) -> jax.Array:
    rows, scales = args
    values = _dequantize(rows, scales, spec)
    if spec.cpu and spec.dtype != "float32":
      values = lax.optimization_barrier(values)
    return fn(values)

  rows = matrix_re.reshape(blocks, spec.block, spec.dim)
  scales = None if scales_rm is None else scales_rm.reshape(blocks, spec.block, spec.n_mem)
  if blocks == 1:
    return jax.tree.map(lambda x: x[None], one((rows[0], None if scales is None else scales[0])))
  return lax.map(one, (rows, scales))


def _row_specs(
  spec: _Spec, scales: Optional[jax.Array]
) -> Tuple[PartitionSpec, Optional[PartitionSpec]]:
  rows = PartitionSpec(AXIS, None)
  return rows, (None if scales is None else rows)


@functools.partial(jax.jit, static_argnames=("spec",))
def _inverse_norms(matrix: jax.Array, scales: Optional[jax.Array], spec: _Spec) -> jax.Array:
  def local(m: jax.Array, s: Optional[jax.Array]) -> jax.Array:
    sq = _blocks(lambda v: jnp.sum(v * v, axis=-1), m, s, spec).reshape(-1)
    return jnp.where(sq > 0, lax.rsqrt(jnp.maximum(sq, 1e-30)), 0.0)

  return _shard_map(
    local, mesh=spec.mesh, in_specs=_row_specs(spec, scales), out_specs=PartitionSpec(AXIS)
  )(matrix, scales)


@functools.partial(jax.jit, static_argnames=("spec", "top_n", "approx", "recall_target"))
def _search(
  matrix: jax.Array,
  scales: Optional[jax.Array],
  inv_norms: jax.Array,
  query_bmd: jax.Array,
  spec: _Spec,
  top_n: int,
  approx: bool,
  recall_target: float,
) -> Tuple[jax.Array, jax.Array]:
  """(scores [B, top_n], global row indices [B, top_n]) of the exact cosine."""
  b = query_bmd.shape[0]
  q = query_bmd.reshape(b, -1)
  q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  k = min(top_n, spec.rows_per_device)

  def local(
    m: jax.Array, s: Optional[jax.Array], inv: jax.Array, q: jax.Array
  ) -> Tuple[jax.Array, jax.Array]:
    scores = _blocks(lambda v: q @ v.T, m, s, spec)  # [R / block, B, block]
    scores = scores.transpose(1, 0, 2).reshape(b, -1) * inv[None]
    start = lax.axis_index(AXIS) * spec.rows_per_device
    rows = start + jnp.arange(spec.rows_per_device)
    scores = jnp.where(rows[None] < spec.num_docs, scores, -jnp.inf)
    if approx:
      top, where = lax.approx_max_k(scores, k, recall_target=recall_target)
    else:
      top, where = lax.top_k(scores, k)
    return top[None], (where + start)[None]

  rows, scale_spec = _row_specs(spec, scales)
  top, where = _shard_map(
    local,
    mesh=spec.mesh,
    in_specs=(rows, scale_spec, PartitionSpec(AXIS), PartitionSpec()),
    out_specs=(PartitionSpec(AXIS), PartitionSpec(AXIS)),
  )(matrix, scales, inv_norms, q)
  # [S, B, k] candidates -> the best top_n of all S * k.
  top = top.transpose(1, 0, 2).reshape(b, -1)
  where = where.transpose(1, 0, 2).reshape(b, -1)
  best, pick = lax.top_k(top, top_n)
  return best, jnp.take_along_axis(where, pick, axis=-1)


@functools.partial(jax.jit, static_argnames=("spec",))
def _gather(
  matrix: jax.Array, scales: Optional[jax.Array], idx_bk: jax.Array, spec: _Spec
) -> jax.Array:
  """Dequantized memories [B, k, n_mem, D] of global rows [B, k]: each device contributes
  the rows it holds, zeros elsewhere, summed over the devices."""

  def local(m: jax.Array, s: Optional[jax.Array], idx: jax.Array) -> jax.Array:
    rel = idx - lax.axis_index(AXIS) * spec.rows_per_device
    held = (rel >= 0) & (rel < spec.rows_per_device)
    rel = jnp.clip(rel, 0, spec.rows_per_device - 1).reshape(-1)
    values = _dequantize(m[rel], None if s is None else s[rel], spec)
    values = jnp.where(held.reshape(-1, 1), values, 0.0)
    return lax.psum(values.reshape(idx.shape + (spec.n_mem, spec.hidden)), AXIS)

  rows, scale_spec = _row_specs(spec, scales)
  return _shard_map(
    local, mesh=spec.mesh, in_specs=(rows, scale_spec, PartitionSpec()), out_specs=PartitionSpec()
  )(matrix, scales, idx_bk)


def answer_rows(
  model: ClaraModel,
  index: MemoryIndex,
  questions: Sequence[str],
  k: int = 5,
  max_new_tokens: int = 64,
  approx: bool = False,
) -> Tuple[List[str], np.ndarray, np.ndarray]:
  """Retrieves k documents per question from the index with the reasoner and answers
  from their stored memories: (answers, doc indices [B, k], scores [B, k])."""
  from clara_jax.data import templates

  if (model.n_mem, model.cfg.hidden_size) != (index.n_mem, index.hidden):
    raise ValueError(
      f"the index holds memories of {index.n_mem} x {index.hidden}, the "
      f"model makes {model.n_mem} x {model.cfg.hidden_size}; build the "
      "index with this model"
    )
  idx, scores = index.search(model.reason(questions), k, approx=approx)
  k = idx.shape[1]
  turns = [templates.answer_turn(q, model.n_mem, k, model.prompt_style) for q in questions]
  answers = model.generate_turns(turns, index.memories(idx), k, max_new_tokens)
  return answers, idx, scores


def iter_answers(
  model: ClaraModel,
  index: MemoryIndex,
  rows: Sequence[Dict],
  k: int = 5,
  batch: int = 32,
  max_new_tokens: int = 64,
  approx: bool = False,
  progress: Optional[Callable[[int, int], None]] = None,
) -> Iterator[Dict]:
  """{id, question, answer, doc_ids, scores} for each row ({"id", "question"}), answered
  `batch` questions at a time."""
  for start in range(0, len(rows), batch):
    part = rows[start : start + batch]
    answers, idx, scores = answer_rows(
      model, index, [r["question"] for r in part], k, max_new_tokens, approx
    )
    for row, answer, ids, row_scores in zip(part, answers, idx, scores):
      yield {
        "id": row["id"],
        "question": row["question"],
        "answer": answer,
        "doc_ids": [index.ids[j] for j in ids],
        "scores": [round(float(s), 6) for s in row_scores],
      }
    if progress is not None:
      progress(start + len(part), len(rows))
