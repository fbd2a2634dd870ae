"""clara_jax.paths on a local directory and on gs:// (the GCS emulator): the same calls,
the same results; atomic writes leave nothing behind when the input fails."""

import gzip

import pytest

from clara_jax import paths
from gcs_emulator import BUCKET


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  request.getfixturevalue("gcs")
  return f"gs://{BUCKET}/{tmp_path.name}"


def test_write_read_list_and_remove(root):
  assert paths.listdir(root) == [] and not paths.exists(root)
  paths.write_json(paths.join(root, "a", "x.json"), {"k": [1, 2]})
  paths.write_text(paths.join(root, "b.txt"), "hello\n")
  paths.write_atomic(paths.join(root, "c.gz"), [gzip.compress(b"zipped\n")])
  assert paths.listdir(root) == ["a", "b.txt", "c.gz"]
  assert paths.isdir(paths.join(root, "a")) and paths.isfile(paths.join(root, "b.txt"))
  assert paths.read_json(paths.join(root, "a", "x.json")) == {"k": [1, 2]}
  assert paths.size(paths.join(root, "b.txt")) == 6
  with paths.open_binary(paths.join(root, "c.gz")) as f:
    assert f.read() == b"zipped\n"
  with paths.local_file(paths.join(root, "b.txt")) as local:
    assert open(local).read() == "hello\n"
  paths.remove(paths.join(root, "a"))
  paths.remove(paths.join(root, "missing"))  # absent: nothing to do
  assert paths.listdir(root) == ["b.txt", "c.gz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(root):
  target = paths.join(root, "rows.jsonl")
  paths.write_text(target, "old\n")

  def rows():
    yield "new row\n"
    raise ValueError("bad input at row 2")

  with pytest.raises(ValueError, match="row 2"):
    paths.write_atomic(target, rows())
  assert paths.read_text(target) == "old\n"
  assert paths.listdir(root) == ["rows.jsonl"]


def test_append_and_exclusive_create(root):
  log = paths.join(root, "metrics.jsonl")
  for line in ("1\n", "2\n"):
    with paths.open_append(log) as f:
      f.write(line)
  assert paths.read_text(log) == "1\n2\n"
  lock = paths.join(root, "LOCK.json")
  assert paths.create_exclusive(lock, "{}")
  assert not paths.create_exclusive(lock, "{}")


def test_local_paths_are_absolute_and_uris_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.join("run", "export") == str(tmp_path / "run" / "export")
  assert paths.join("gs://b/run", "export") == "gs://b/run/export"
  assert paths.is_remote("gs://b/x") and not paths.is_remote(str(tmp_path))
