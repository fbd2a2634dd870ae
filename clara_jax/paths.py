"""One path API for every path a user gives: local directories and object stores alike.

Workdirs, checkpoints, metrics, exports, data, tokenizers and indexes all go through
`etils.epath`, so `--workdir=gs://bucket/run` works wherever a local directory does
(`s3://` and the other schemes epath knows too). Orbax and TensorStore reach the same
stores themselves (checkpoints of a `gs://` workdir go through TensorStore's GCS driver).

Local paths are made absolute once, where they enter (`path`), so a later change of the
working directory cannot move them; URIs are kept as given. (`join(..., absolute=False)`
keeps a local path as the user typed it, for paths that end up in messages.)

Atomic writes: a local file is written to a temporary file beside it and renamed into
place; an object store has no rename, but an object upload is all or nothing, so the
bytes are first produced into a local temporary file (a failure while producing them,
such as bad input, touches nothing remote) and then uploaded in one piece. Either way an
existing file is never left half written.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import posixpath
import tempfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, TextIO, Union

from etils import epath

PathLike = Union[str, os.PathLike]
_WRITE_BUFFER = 1 << 20
_READ_BUFFER = 1 << 20


def is_remote(p: PathLike) -> bool:
  """Whether `p` names an object store (`scheme://...`) rather than a local file."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: local paths absolute, URIs unchanged."""
  if isinstance(p, epath.Path) and (is_remote(p) or os.path.isabs(os.fspath(p))):
    return p
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.abspath(s))


def join(p: PathLike, *parts: str, absolute: bool = True) -> str:
  """`p / parts...` as a string (for APIs that take strings), URIs kept intact.

  A local `p` is made absolute (`path`), unless `absolute=False`: then it is kept as the
  user gave it (a relative path stays relative), so messages name what was typed. Every
  function here accepts either result.
  """
  out = path(p) if absolute else epath.Path(os.fspath(p))
  return os.fspath(out.joinpath(*parts))


def resolve(base: PathLike, *parts: str) -> str:
  """`base/parts...` with `.` and `..` resolved, for local paths and URIs alike: a part
  that is a URI or an absolute path starts over from itself (as os.path.join), and a
  URI's `scheme://bucket` stays intact and is never climbed above (os.path.normpath
  would turn `gs://b` into `gs:/b`). Local results are absolute."""
  out = os.fspath(base)
  for part in parts:
    out = part if is_remote(part) else join(out, part)
  out = join(out)  # a lone local base made absolute too
  if not is_remote(out):
    return posixpath.normpath(out)
  scheme, rest = out.split("://", 1)
  bucket, _, key = rest.partition("/")
  key = posixpath.normpath("/" + key).lstrip("/")
  return f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"


def parent(p: PathLike) -> str:
  return os.fspath(path(p).parent)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list:
  """Names (not paths) in directory `p`, sorted; [] when it does not exist."""
  q = path(p)
  if not q.is_dir():
    return []
  return sorted(child.name for child in q.iterdir())


def remove(p: PathLike) -> None:
  """Removes a file or a whole directory; nothing when absent."""
  q = path(p)
  if q.is_dir():
    q.rmtree()
  elif q.exists():
    q.unlink()


def size(p: PathLike) -> int:
  return int(path(p).stat().length)


def read_text(p: PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


class _GzipReader(gzip.GzipFile):
  """A GzipFile that also closes the stream it reads (GzipFile leaves it open)."""

  def __init__(self, raw: BinaryIO) -> None:
    super().__init__(fileobj=raw, mode="rb")
    self._raw = raw

  def close(self) -> None:
    try:
      super().close()
    finally:
      self._raw.close()


class _RawReader(io.RawIOBase):
  """`readinto` over a stream that only has `read(n)`, so that an `io.BufferedReader` can
  be put on it."""

  def __init__(self, f: Any) -> None:
    super().__init__()
    self._f = f

  def readable(self) -> bool:
    return True

  def readinto(self, buffer: Any) -> int:
    data = self._f.read(len(buffer))
    buffer[: len(data)] = data
    return len(data)

  def close(self) -> None:
    if not self.closed:
      self._f.close()
    super().close()


def open_binary(p: PathLike) -> io.BufferedIOBase:
  """Opens `p` for reading bytes (`.gz` files decompressed) as a buffered stream whose
  `readline(size)` honours `size` whatever the store: object-store files (fsspec's,
  TensorFlow's GFile) have a `readline()` without that limit, so they are read through
  an `io.BufferedReader` of _READ_BUFFER bytes."""
  f = path(p).open("rb")
  if os.fspath(p).endswith(".gz"):
    return _GzipReader(f)
  return f if isinstance(f, io.BufferedIOBase) else io.BufferedReader(_RawReader(f), _READ_BUFFER)


def open_append(p: PathLike) -> TextIO:
  """A text stream appending to `p`. Object stores cannot append: there the file is read
  and written back whole on close, which is right for the small logs this is used for
  (metrics rows), and the write is all or nothing."""
  q = path(p)
  if not is_remote(q):
    makedirs(q.parent)
    return open(os.fspath(q), "a", encoding="utf-8")
  return _RewriteOnClose(q)


class _RewriteOnClose(io.StringIO):
  def __init__(self, p: epath.Path) -> None:
    super().__init__(p.read_text(encoding="utf-8") if p.exists() else "")
    self.seek(0, io.SEEK_END)
    self._path = p

  def close(self) -> None:
    if not self.closed:
      write_atomic(self._path, [self.getvalue()])
    super().close()


def default_file_mode() -> int:
  """The mode `open(path, "w")` would give a new file: 0666 less the process umask."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def _write_all(fd: int, data: bytes) -> None:
  """Every byte of `data` to `fd` (os.write may write fewer). The one low-level write of
  the atomic writers, so a full disk surfaces here, as OSError(ENOSPC)."""
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view) :]


def _write_local_temp(target: str, directory: str, chunks: Iterable[Union[str, bytes]]) -> str:
  """The chunks into a new temporary file in `directory`; its path. Errors name `target`,
  not the temporary file the user never asked for; the temporary file is removed on any
  failure."""
  try:
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=f".{os.path.basename(target)}", dir=directory)
  except OSError as e:
    raise type(e)(
      e.errno, f"cannot write {target}: {e.strerror} (creating a file in {directory})"
    ) from None

  def write(data: bytes) -> None:
    try:
      _write_all(fd, data)
    except OSError as e:
      raise type(e)(e.errno, f"{e.strerror}: writing {target}") from None

  try:
    try:
      buffered, buffered_size = [], 0
      for chunk in chunks:
        data = chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)
        buffered.append(data)
        buffered_size += len(data)
        if buffered_size >= _WRITE_BUFFER:
          write(b"".join(buffered))
          buffered, buffered_size = [], 0
      write(b"".join(buffered))
      os.fchmod(fd, default_file_mode())  # mkstemp's 0600 would hide it from the team
    finally:
      os.close(fd)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return tmp


def write_atomic(p: PathLike, chunks: Iterable[Union[str, bytes]]) -> None:
  """Writes `chunks` (text is UTF-8 encoded) to `p` all or nothing: a failure (bad input
  raised by `chunks`, a full disk, no permission) never leaves a partial file, never
  leaves the temporary one and never touches an existing `p`."""
  q = path(p)
  target = os.fspath(p)  # messages name the path as given, not made absolute
  if q.is_dir():
    raise IsADirectoryError(f"{target}: is a directory; expected a file to write")
  if is_remote(q):
    tmp = _write_local_temp(target, tempfile.gettempdir(), chunks)
    try:
      q.parent.mkdir(parents=True, exist_ok=True)
      with open(tmp, "rb") as src, q.open("wb") as dst:
        while block := src.read(_WRITE_BUFFER):
          dst.write(block)
    finally:
      os.remove(tmp)
    return
  directory = os.path.dirname(os.fspath(q))
  os.makedirs(directory, exist_ok=True)
  tmp = _write_local_temp(target, directory, chunks)
  try:
    os.replace(tmp, os.fspath(q))
  except BaseException:
    os.remove(tmp)
    raise


def write_text(p: PathLike, text: str) -> None:
  write_atomic(p, [text])


def write_json(
  p: PathLike,
  obj: Any,
  indent: Optional[int] = 1,
  default: Optional[Callable[[Any], Any]] = None,
) -> None:
  """One JSON document, written all or nothing; `default` as in `json.dumps` (e.g. str
  for values JSON has no type for)."""
  write_atomic(p, [json.dumps(obj, indent=indent, sort_keys=False, default=default)])


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
  """A local filename holding `p`'s bytes, for libraries that read only local files: `p`
  itself when local, else a temporary copy removed on exit."""
  q = path(p)
  if not is_remote(q):
    yield os.fspath(q)
    return
  fd, tmp = tempfile.mkstemp(suffix=f".{q.name}")
  try:
    with os.fdopen(fd, "wb") as dst, q.open("rb") as src:
      while block := src.read(_WRITE_BUFFER):
        dst.write(block)
    yield tmp
  finally:
    os.remove(tmp)


def create_exclusive(p: PathLike, text: str) -> bool:
  """Creates file `p` holding `text` only if absent; whether it did. Exclusive on local
  filesystems (O_EXCL); on an object store the check and the write are two requests, so
  two starters within the same instant could both succeed."""
  q = path(p)
  if is_remote(q):
    if q.exists():
      return False
    write_text(q, text)
    return True
  try:
    fd = os.open(os.fspath(q), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True
