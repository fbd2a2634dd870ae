"""Document-memory index: build, resume after interruption, sharded search."""

import hashlib

import numpy as np
import pytest

from clara_jax.infer.index import MemoryIndex, build_index


def fake_compress(texts, calls=None):
  """Deterministic pseudo-memories [n, 2, 8] from the text."""
  if calls is not None:
    calls.append(len(texts))
  out = []
  for t in texts:
    seed = int(hashlib.md5(t.encode()).hexdigest()[:8], 16)
    out.append(np.random.default_rng(seed).normal(size=(2, 8)))
  return np.asarray(out)


DOCS = [{"id": f"d{i}", "text": f"document number {i}"} for i in range(37)]


def test_build_resume_and_search(tmp_path):
  out = str(tmp_path / "idx")
  calls = []

  def failing(texts):
    if len(calls) == 2:
      raise KeyboardInterrupt("interrupted")
    return fake_compress(texts, calls)

  with pytest.raises(KeyboardInterrupt):
    build_index(failing, DOCS, out, shard_size=10)
  with pytest.raises(FileNotFoundError, match="did not finish"):
    MemoryIndex.load(out)
  resumed = []
  meta = build_index(lambda t: fake_compress(t, resumed), DOCS, out, shard_size=10)
  assert meta["num_shards"] == 4 and resumed == [10, 7]  # shards 0 and 1 were kept
  index = MemoryIndex.load(out)
  assert len(index.ids) == 37 and index.matrix.shape[0] % 8 == 0
  assert len(index.matrix.addressable_shards) == 8
  queries = fake_compress(["document number 5", "document number 30", "other"])
  idx, scores = index.search(queries, top_n=3)
  # Brute force in numpy (float16 storage: compare ranks, scores loosely).
  mem = fake_compress([d["text"] for d in DOCS]).astype(np.float16).astype(np.float32)
  flat = mem.reshape(37, -1)
  flat /= np.linalg.norm(flat, axis=-1, keepdims=True)
  q = queries.reshape(3, -1)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  want = np.argsort(-(q @ flat.T), axis=-1)[:, :3]
  np.testing.assert_array_equal(idx, want)
  assert index.ids[idx[0, 0]] == "d5" and index.ids[idx[1, 0]] == "d30"
  np.testing.assert_allclose(scores[:2, 0], 1.0, atol=1e-3)
  assert np.all(idx < 37)  # padding rows are never returned


def test_shards_of_other_inputs_are_never_reused(tmp_path):
  import os
  from clara_jax.data import fingerprint
  corpus, export = tmp_path / "corpus.jsonl", tmp_path / "export"
  corpus.write_text("one\n")
  export.mkdir()
  (export / "params.npz").write_bytes(b"weights v1")
  inputs = lambda: {"export": fingerprint.dir_fingerprint(str(export)),
                    "corpus": fingerprint.file_fingerprint(str(corpus))}
  out = str(tmp_path / "idx")
  build_index(fake_compress, DOCS, out, shard_size=10, inputs=inputs())
  contents = lambda: {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  before = contents()
  build_index(fake_compress, DOCS, out, shard_size=10, inputs=inputs())  # same: reused
  (export / "params.npz").write_bytes(b"weights v2")  # a retrained export
  with pytest.raises(fingerprint.StaleArtefact,
                     match=r"export.files.params.npz.(bytes|sha256).*Remove it to rebuild"):
    build_index(fake_compress, DOCS, out, shard_size=10, inputs=inputs())
  (export / "params.npz").write_bytes(b"weights v1")
  with pytest.raises(fingerprint.StaleArtefact, match="shard_size: 10 -> 12"):
    build_index(fake_compress, DOCS, out, shard_size=12, inputs=inputs())
  assert contents() == before
  with pytest.raises(ValueError, match="shard_size must be at least 1"):
    build_index(fake_compress, DOCS, str(tmp_path / "other"), shard_size=0)
