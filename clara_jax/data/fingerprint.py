"""Fingerprints of the inputs a derived artefact was built from (prepared TFDS data, index
shards), so that a later run reuses it only when its inputs are the same.

A file is known by its size and content hash (files up to `HASH_LIMIT`; larger ones by
size and modification time, since hashing tens of gigabytes on every start would cost
more than it saves). Paths are recorded but not compared: the same bytes moved
elsewhere are the same input.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping

from clara_jax import paths

HASH_LIMIT = 1 << 30  # bytes: larger files are known by size and mtime
FINGERPRINT_SUFFIX = ".fingerprint.json"


class StaleArtefact(ValueError):
  """A derived artefact was built from other inputs than the ones given now."""


def file_fingerprint(path: str) -> Dict[str, Any]:
  """Local files or object-store ones (`gs://...`)."""
  p = paths.path(path)
  stat = p.stat()
  size = int(stat.length)
  out: Dict[str, Any] = {"path": os.fspath(p), "bytes": size}
  if size <= HASH_LIMIT:
    digest = hashlib.sha256()
    with p.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    out["sha256"] = digest.hexdigest()
  elif paths.is_remote(p):  # an object store gives whole seconds
    out["mtime_ns"] = int(stat.mtime) * 1_000_000_000
  else:  # epath's stat rounds to seconds; records have always held nanoseconds
    out["mtime_ns"] = os.stat(os.fspath(p)).st_mtime_ns
  return out


def dir_fingerprint(directory: str) -> Dict[str, Any]:
  """{relative file name: file_fingerprint} of every file under `directory`."""
  top = paths.path(directory)
  out = {}

  def visit(folder: Any, prefix: str) -> None:
    # iterdir, not epath's walk: walk's fsspec backend drops the `gs://` of the roots.
    for child in sorted(folder.iterdir(), key=lambda c: c.name):
      if child.is_dir():
        visit(child, f"{prefix}{child.name}/")
      else:
        out[prefix + child.name] = file_fingerprint(os.fspath(child))

  visit(top, "")
  return {"path": os.fspath(top), "files": out}


def _comparable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _comparable(v) for k, v in value.items() if k != "path"}
  return value


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, tuple]:
  """{dotted key: (recorded, current)} where the two differ (paths aside)."""
  out: Dict[str, tuple] = {}

  def walk(prefix: str, a: Any, b: Any) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      for key in sorted(set(a) | set(b)):
        walk(f"{prefix}{key}.", a.get(key), b.get(key))
    elif a != b:
      out[prefix.rstrip(".")] = (a, b)

  walk("", _comparable(recorded), _comparable(current))
  return out


def check_or_record(record_path: str, current: Mapping[str, Any], what: str) -> None:
  """Writes `current` to `record_path` the first time; afterwards raises `StaleArtefact`
  naming each differing input when `current` is not what was recorded."""
  if paths.exists(record_path):
    recorded = paths.read_json(record_path)
    changed = differences(recorded, current)
    if changed:
      shown = "; ".join(
        f"{k}: {_short(old)} -> {_short(new)}" for k, (old, new) in list(changed.items())[:5]
      )
      more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
      raise StaleArtefact(
        f"{what} was built from other inputs ({record_path}): {shown}"
        f"{more}. Remove it to rebuild, or use another output"
      )
    return
  from clara_jax.data.formats import write_json_atomic

  write_json_atomic(record_path, current)  # makes the directory


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True) if value is not None else "absent"
  return text if len(text) <= 40 else text[:37] + "..."
