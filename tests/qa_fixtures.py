"""What the converter and real-data tests share: the real QA files' directory (the
`CLARA_DATA` environment variable, else `shared/data` beside the checkout; tests that
read it skip when it is absent) and the animal names of their hand-written rows."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("CLARA_DATA") or os.path.join(ROOT, "..", "shared", "data")

ANIMALS = [
  "otter",
  "heron",
  "lynx",
  "badger",
  "marten",
  "ibis",
  "vole",
  "newt",
  "stoat",
  "crane",
  "shrew",
  "gecko",
  "egret",
  "mink",
  "kite",
  "wren",
  "finch",
  "hare",
  "moth",
  "carp",
  "pike",
  "tern",
  "rook",
  "swift",
]


def shared_path(name: str = "") -> str:
  """A file (or, with no name, the directory) of the real QA files; skips the test when
  it is absent."""
  path = os.path.join(SHARED, name) if name else SHARED
  if not os.path.exists(path):
    pytest.skip(f"{path} not present")
  return path
