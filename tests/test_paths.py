"""clara_jax.paths on a local directory and on gs:// (the GCS emulator): the same calls,
the same results; atomic writes leave nothing behind when the input fails."""

import gzip
import io

import pytest
from etils import epath
from gcs_emulator import BUCKET

from clara_jax import paths


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


def test_join_keeps_a_path_as_given_when_not_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.join("run", "export", "x.json", absolute=False) == "run/export/x.json"
  assert paths.join(epath.Path("run"), "x", absolute=False) == "run/x"
  assert paths.join("/abs/run", "x", absolute=False) == "/abs/run/x"
  assert paths.join("gs://b/run", "x", absolute=False) == "gs://b/run/x"
  assert paths.join("run", absolute=False) == "run"


def test_resolve_climbs_local_paths_and_uris_but_never_above_the_bucket(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/stage2", "..", "data", "w") == str(tmp_path / "runs" / "data" / "w")
  assert paths.resolve("run") == str(tmp_path / "run")  # a lone base made absolute
  assert paths.resolve("runs/stage2", "/abs/./x") == "/abs/x"  # an absolute part restarts
  assert paths.resolve("gs://b/runs/stage2", "..", "data", "w") == "gs://b/runs/data/w"
  assert paths.resolve("gs://b/runs", "..", "..", "..") == "gs://b"
  assert paths.resolve("runs/stage2", "gs://c/x/../y") == "gs://c/y"  # a URI part restarts


def test_open_binary_reads_lines_of_a_bounded_size_on_every_store(root):
  target = paths.join(root, "lines.txt")
  paths.write_text(target, "a" * 10 + "\nb\n")
  with paths.open_binary(target) as f:
    assert isinstance(f, io.BufferedIOBase)
    assert f.readline(4) == b"aaaa"
    assert f.readline() == b"a" * 6 + b"\n"
    assert f.readline(100) == b"b\n" and f.readline(100) == b""


def test_metrics_rows_are_appended_at_once_locally_and_in_batches_remotely(root, monkeypatch):
  from clara_jax.train.metrics import MetricsWriter, read_metrics

  opened = []
  open_append = paths.open_append
  monkeypatch.setattr(paths, "open_append", lambda p: opened.append(p) or open_append(p))

  def steps():
    return [row["step"] for row in read_metrics(root)]

  remote = paths.is_remote(root)
  writer = MetricsWriter(root, tensorboard=False, remote_flush_rows=3)
  for step in (1, 2):
    writer.write_scalars(step, {"loss": 1.0 / step})
  assert steps() == ([] if remote else [1, 2])
  writer.write_scalars(3, {"loss": 0.3})  # the third row: a remote file is rewritten
  assert steps() == [1, 2, 3]
  writer.write_scalars(4, {"loss": 0.25})
  assert steps() == ([1, 2, 3] if remote else [1, 2, 3, 4])
  writer.flush()  # as before a checkpoint is saved
  assert steps() == [1, 2, 3, 4]
  writer.write_scalars(5, {"loss": 0.2})
  writer.close()
  assert steps() == [1, 2, 3, 4, 5]
  assert len(opened) == (3 if remote else 5)
  # A run resumed from step 3 drops the rows logged after it, then logs them again.
  writer = MetricsWriter(root, tensorboard=False, resume_step=3)
  assert steps() == [1, 2, 3]
  writer.write_scalars(4, {"loss": 0.5})
  writer.close()
  assert steps() == [1, 2, 3, 4]
  assert read_metrics(root)[-1]["loss"] == 0.5
