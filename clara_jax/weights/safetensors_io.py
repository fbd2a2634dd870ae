"""A small, torch-free reader and writer for the safetensors format.

Layout of a file (https://github.com/huggingface/safetensors):

    8 bytes      N, the header length, unsigned little-endian
    N bytes      a UTF-8 JSON object: {"__metadata__": {str: str}, (optional)
                                       name: {"dtype": "F32", "shape": [..],
                                              "data_offsets": [begin, end]}, ...}
    rest         the data buffer; offsets are relative to its start, little-endian,
                 C order

Tensors are returned as read-only numpy views of a memory map, so a multi-gigabyte
checkpoint is read from disk only as each tensor is touched (and converted).

Sharded checkpoints (`model.safetensors.index.json`, whose `weight_map` names each
tensor's shard) and single-file ones (`model.safetensors`) are both opened by
`SafetensorsCheckpoint`. Paths may name an object store (`gs://...`): headers are read
from it directly, and a file's data is copied to a local temporary file to be mapped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from clara_jax import paths

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The reference implementation refuses larger headers; so do we, which also stops a
# corrupt length field from making us read gigabytes as JSON.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype codes -> numpy dtypes (explicitly little-endian where it matters).
DTYPES: Dict[str, np.dtype] = {
  "BOOL": np.dtype(np.bool_),
  "U8": np.dtype("<u1"),
  "I8": np.dtype("<i1"),
  "U16": np.dtype("<u2"),
  "I16": np.dtype("<i2"),
  "U32": np.dtype("<u4"),
  "I32": np.dtype("<i4"),
  "U64": np.dtype("<u8"),
  "I64": np.dtype("<i8"),
  "F16": np.dtype("<f2"),
  "F32": np.dtype("<f4"),
  "F64": np.dtype("<f8"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One header entry: dtype code, shape, and [begin, end) byte range in the data buffer."""

  dtype: str
  shape: Tuple[int, ...]
  data_offsets: Tuple[int, int]

  @property
  def nbytes(self) -> int:
    return self.data_offsets[1] - self.data_offsets[0]


def dtype_code(dtype: np.dtype) -> str:
  """The safetensors code of a numpy dtype (byte order ignored); ValueError if none."""
  dtype = np.dtype(dtype)
  if dtype.byteorder == ">":
    dtype = dtype.newbyteorder("<")
  for code, candidate in DTYPES.items():
    if candidate == dtype:
      return code
  raise ValueError(f"dtype {dtype} has no safetensors code; supported: {sorted(DTYPES)}")


def _parse_entry(path: str, name: str, entry: Any) -> TensorInfo:
  where = f"{path}: tensor {name!r}"
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: header entry must be an object, found {entry!r}")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
  if missing:
    raise ValueError(f"{where}: header entry lacks {missing}")
  code = entry["dtype"]
  if code not in DTYPES:
    raise ValueError(f"{where}: unknown dtype {code!r}; supported: {sorted(DTYPES)}")
  shape = entry["shape"]
  if not (
    isinstance(shape, list)
    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
  ):
    raise ValueError(f"{where}: shape must be a list of non-negative ints, found {shape!r}")
  offsets = entry["data_offsets"]
  if not (
    isinstance(offsets, list)
    and len(offsets) == 2
    and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    and 0 <= offsets[0] <= offsets[1]
  ):
    raise ValueError(
      f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, found {offsets!r}"
    )
  info = TensorInfo(code, tuple(shape), (offsets[0], offsets[1]))
  expected = int(np.prod(info.shape, dtype=np.int64)) * DTYPES[code].itemsize
  if info.nbytes != expected:
    raise ValueError(
      f"{where}: data_offsets {offsets} span {info.nbytes} bytes, but "
      f"{code}{list(shape)} needs {expected}"
    )
  return info


def read_header(path: str) -> Tuple[int, Dict[str, TensorInfo], Dict[str, str]]:
  """Parses and validates a file's header.

  Returns:
    (byte offset of the data buffer, {name: TensorInfo}, the `__metadata__` dict).

  Raises:
    FileNotFoundError: no such file.
    ValueError (naming the file): a truncated file, a malformed header, an unknown dtype,
      or tensor offsets outside the file or overlapping.
  """
  path = os.fspath(path)
  file_size = paths.size(path)
  header_len, raw = _read_header_bytes(path, file_size)
  header = _header_object(path, raw)
  metadata = _header_metadata(path, header)
  infos = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
  data_start = 8 + header_len
  _check_offsets(path, infos, file_size - data_start)
  return data_start, infos, metadata


def _read_header_bytes(path: str, file_size: int) -> Tuple[int, bytes]:
  """(its length, the JSON header), after checking its 8-byte length against the file's size."""
  with paths.path(path).open("rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(
        f"{path}: truncated safetensors file ({file_size} bytes; the 8-byte "
        "header length alone needs 8)"
      )
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
      raise ValueError(
        f"{path}: bad safetensors header length {header_len} (limit "
        f"{MAX_HEADER_BYTES}); not a safetensors file?"
      )
    if 8 + header_len > file_size:
      raise ValueError(
        f"{path}: truncated safetensors file ({file_size} bytes) or bad "
        f"header: the header claims {header_len} bytes after the first 8"
      )
    return header_len, f.read(header_len)


def _header_object(path: str, raw: bytes) -> Dict[str, Any]:
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: bad safetensors header (not UTF-8 JSON): {e}") from None
  if not isinstance(header, dict):
    raise ValueError(
      f"{path}: bad safetensors header: expected a JSON object, found {type(header).__name__}"
    )
  return header


def _header_metadata(path: str, header: Dict[str, Any]) -> Dict[str, str]:
  """Pops and checks the header's `__metadata__` (str -> str; absent: {})."""
  metadata = header.pop("__metadata__", None) or {}
  if not (
    isinstance(metadata, dict)
    and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
  ):
    raise ValueError(f"{path}: bad safetensors header: __metadata__ must map str to str")
  return metadata


def _check_offsets(path: str, infos: Dict[str, TensorInfo], data_len: int) -> None:
  """Every tensor lies inside the data buffer and no two overlap."""
  previous_end, previous_name = 0, None
  for name, info in sorted(infos.items(), key=lambda kv: kv[1].data_offsets):
    begin, end = info.data_offsets
    if end > data_len:
      raise ValueError(
        f"{path}: tensor {name!r} data_offsets [{begin}, {end}] lie outside the file's "
        f"{data_len}-byte data buffer (truncated file?)"
      )
    if info.nbytes:  # an empty tensor occupies no bytes, so it overlaps nothing
      if begin < previous_end:
        raise ValueError(f"{path}: tensors {previous_name!r} and {name!r} overlap")
      previous_end, previous_name = end, name


class _NamedTensors:
  """`keys()`, `in` and `len()` over the tensor names that `_names` is keyed by."""

  @property
  def _names(self) -> Dict[str, Any]:
    raise NotImplementedError

  def keys(self) -> List[str]:
    return list(self._names)

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def __len__(self) -> int:
    return len(self._names)


class SafetensorsFile(_NamedTensors):
  """One safetensors file, memory-mapped; `get(name)` returns a read-only numpy view."""

  def __init__(self, path: str) -> None:
    self.path = os.fspath(path)
    data_start, self._infos, self.metadata = read_header(self.path)
    data_len = paths.size(self.path) - data_start
    # A local file is mapped in place; an object-store one through a local copy, removed
    # on `close` (or when this object goes), which leaves a live map valid on POSIX.
    self._local = contextlib.ExitStack()
    self._release = weakref.finalize(self, self._local.close)
    if data_len > 0:
      local = self._local.enter_context(paths.local_file(self.path))
      self._data: np.ndarray = np.memmap(
        local, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)
      )
    else:  # mmap refuses empty ranges
      self._data = np.zeros((0,), np.uint8)

  @property
  def _names(self) -> Dict[str, TensorInfo]:
    return self._infos

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def info(self, name: str) -> TensorInfo:
    if name not in self._infos:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    return self._infos[name]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only view of the memory map (copy it to keep it)."""
    info = self.info(name)
    begin, end = info.data_offsets
    flat = np.asarray(self._data[begin:end]).view(DTYPES[info.dtype])
    return flat.reshape(info.shape)

  def close(self) -> None:
    """Drops the map (views already returned stay valid: they hold their own reference)."""
    self._data = np.zeros((0,), np.uint8)
    self._infos = {}
    self._release()

  def __enter__(self) -> "SafetensorsFile":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
  """All tensors of one file, as read-only memory-mapped numpy arrays."""
  f = SafetensorsFile(path)
  return {name: f.get(name) for name in f.keys()}


def write_safetensors(
  path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None
) -> None:
  """Writes `tensors` (name -> numpy array) as one safetensors file.

  The header is space-padded to a multiple of 8 bytes (as the reference writer does) so
  that every tensor of an 8-byte dtype starts aligned in a memory map. Written all or
  nothing (`paths.write_atomic`), so a crash never leaves a half-written file behind.
  """
  path = os.fspath(path)
  arrays = {}
  header: Dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for name in sorted(tensors):
    if name == "__metadata__":
      raise ValueError(f"{path}: '__metadata__' is reserved and cannot name a tensor")
    arr = np.asarray(tensors[name])
    code = dtype_code(arr.dtype)
    arr = np.asarray(arr, dtype=DTYPES[code], order="C")  # (ascontiguousarray makes 0-d 1-d)
    arrays[name] = arr
    header[name] = {
      "dtype": code,
      "shape": list(arr.shape),
      "data_offsets": [offset, offset + arr.nbytes],
    }
    offset += arr.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)

  def chunks() -> Iterator[bytes]:
    yield struct.pack("<Q", len(raw))
    yield raw
    for name in sorted(arrays):
      yield arrays[name].tobytes()

  paths.write_atomic(path, chunks())


class SafetensorsCheckpoint(_NamedTensors):
  """The tensors of a checkpoint directory: sharded (`model.safetensors.index.json`) or a
  single `model.safetensors`. Only headers are read on opening; data is memory-mapped.
  """

  def __init__(self, ckpt_dir: str) -> None:
    self.ckpt_dir = os.fspath(ckpt_dir)
    index_path = paths.join(self.ckpt_dir, INDEX_FILE, absolute=False)
    single_path = paths.join(self.ckpt_dir, SINGLE_FILE, absolute=False)
    self._files: Dict[str, SafetensorsFile] = {}
    self._file_of: Dict[str, str] = {}
    if paths.exists(index_path):
      self._open_sharded(index_path)
    elif paths.exists(single_path):
      f = SafetensorsFile(single_path)
      self._files[single_path] = f
      self._file_of = {name: single_path for name in f.keys()}
    else:
      found = paths.listdir(self.ckpt_dir) if paths.isdir(self.ckpt_dir) else None
      hint = ""
      if found and any(n.endswith((".bin", ".pt", ".pth")) for n in found):
        hint = (
          "; PyTorch pickle checkpoints are not read here: re-save the model with "
          "save_pretrained(..., safe_serialization=True)"
        )
      raise FileNotFoundError(
        f"{self.ckpt_dir}: expected {INDEX_FILE} (sharded) or {SINGLE_FILE}; "
        f"found {found if found is not None else 'no such directory'}{hint}"
      )

  def _open_sharded(self, index_path: str) -> None:
    try:
      index = json.loads(paths.read_text(index_path))
    except json.JSONDecodeError as e:
      raise ValueError(f"{index_path}: not valid JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (
      isinstance(weight_map, dict)
      and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
      raise ValueError(
        f"{index_path}: expected a 'weight_map' object mapping tensor names to shard file names"
      )
    for name, shard in weight_map.items():
      shard_path = paths.join(self.ckpt_dir, shard, absolute=False)
      if shard_path not in self._files:
        if not paths.exists(shard_path):
          raise FileNotFoundError(
            f"{shard_path}: missing; {index_path} lists it as the shard of {name!r}"
          )
        self._files[shard_path] = SafetensorsFile(shard_path)
      if name not in self._files[shard_path]:
        raise ValueError(f"{shard_path}: has no tensor {name!r}, which {index_path} places there")
      self._file_of[name] = shard_path

  @property
  def files(self) -> List[str]:
    """Paths of the files read (one, or every shard)."""
    return list(self._files)

  @property
  def _names(self) -> Dict[str, str]:
    return self._file_of

  def file_of(self, name: str) -> str:
    """The path of the file holding `name`."""
    if name not in self._file_of:
      raise KeyError(f"{self.ckpt_dir}: checkpoint has no tensor {name!r}")
    return self._file_of[name]

  def info(self, name: str) -> TensorInfo:
    return self._files[self.file_of(name)].info(name)

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only view of its shard's memory map."""
    return self._files[self.file_of(name)].get(name)

  def close(self) -> None:
    for f in self._files.values():
      f.close()

  def __enter__(self) -> "SafetensorsCheckpoint":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
