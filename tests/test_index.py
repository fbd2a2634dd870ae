"""Document-memory index: build, resume after interruption, storage dtypes, sharded
search against brute force, the `answer` command and the index plan."""

import hashlib
import json

import ml_dtypes
import numpy as np
import pytest

from clara_jax import cli
from clara_jax.infer.index import (
  STORAGE_DTYPES,
  MemoryIndex,
  build_index,
  decode,
  encode,
  read_shards,
)
from tests.random_export import WORDS, tiny_random_model, write_export


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


def _interrupt_at_third_shard(out: str, **build_args) -> None:
  """A build of DOCS in shards of 10 that stops (KeyboardInterrupt) while compressing
  the third shard: two finished shards stay in `out`."""
  calls = []

  def failing(texts):
    if len(calls) == 2:
      raise KeyboardInterrupt("interrupted")
    return fake_compress(texts, calls)

  with pytest.raises(KeyboardInterrupt):
    build_index(failing, DOCS, out, shard_size=10, **build_args)


def test_build_resume_and_search(tmp_path):
  out = str(tmp_path / "idx")
  _interrupt_at_third_shard(out)
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
  inputs = lambda: {
    "export": fingerprint.dir_fingerprint(str(export)),
    "corpus": fingerprint.file_fingerprint(str(corpus)),
  }
  out = str(tmp_path / "idx")
  build_index(fake_compress, DOCS, out, shard_size=10, inputs=inputs())
  contents = lambda: {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  before = contents()
  build_index(fake_compress, DOCS, out, shard_size=10, inputs=inputs())  # same: reused
  (export / "params.npz").write_bytes(b"weights v2")  # a retrained export
  with pytest.raises(
    fingerprint.StaleArtefact, match=r"export.files.params.npz.(bytes|sha256).*Remove it to rebuild"
  ):
    build_index(fake_compress, DOCS, out, shard_size=10, inputs=inputs())
  (export / "params.npz").write_bytes(b"weights v1")
  with pytest.raises(fingerprint.StaleArtefact, match="shard_size: 10 -> 12"):
    build_index(fake_compress, DOCS, out, shard_size=12, inputs=inputs())
  assert contents() == before
  with pytest.raises(ValueError, match="shard_size must be at least 1"):
    build_index(fake_compress, DOCS, str(tmp_path / "other"), shard_size=0)


# ----------------------------------------------------------------- storage dtypes, search


def _unit_rows(x):
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  return flat / np.linalg.norm(flat, axis=-1, keepdims=True)


def _brute_force(values_nmh, queries_bmh, top_n):
  """(indices [B, n], scores [B, n]) of the cosine in float64: the reference."""
  scores = _unit_rows(queries_bmh) @ _unit_rows(values_nmh).T
  order = np.argsort(-scores, axis=-1, kind="stable")[:, :top_n]
  return order, np.take_along_axis(scores, order, axis=-1)


def test_int8_and_bfloat16_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 3, 16)).astype(np.float32) * rng.uniform(0.01, 100, (50, 3, 1))
  x[7, 1] = 0.0  # an all-zero vector: scale 0, decoded exactly
  stored = encode(x, "int8")
  assert stored["memories"].dtype == np.int8 and stored["scales"].shape == (50, 3)
  back = decode(stored, "int8")
  bound = np.abs(x).max(axis=-1, keepdims=True) / 254  # half a step of max|x| / 127
  assert np.all(np.abs(back - x) <= bound * (1 + 1e-6))
  assert np.all(back[7, 1] == 0.0)
  bf16 = encode(x, "bfloat16")
  assert bf16["memories"].dtype == np.uint16
  np.testing.assert_array_equal(
    decode(bf16, "bfloat16").astype(np.float32), x.astype(ml_dtypes.bfloat16).astype(np.float32)
  )
  assert np.all(np.abs(decode(bf16, "bfloat16").astype(np.float32) - x) <= np.abs(x) * 2.0**-8)
  # Through the files and onto the devices: the same values.
  for dtype in ("int8", "bfloat16"):
    out = str(tmp_path / dtype)
    meta = build_index(
      lambda t: x[[int(s) for s in t]],
      [{"id": f"d{i}", "text": str(i)} for i in range(50)],
      out,
      shard_size=16,
      dtype=dtype,
    )
    assert meta["dtype"] == dtype and (meta["n_mem"], meta["hidden"]) == (3, 16)
    assert meta["bytes_per_doc"] == {"int8": 3 * 16 + 3 * 4, "bfloat16": 3 * 16 * 2}[dtype]
    ids, values = read_shards(out)
    np.testing.assert_array_equal(
      values.astype(np.float32), decode(encode(x, dtype), dtype).astype(np.float32)
    )
    index = MemoryIndex.load(out)
    assert index.matrix.dtype == {"int8": np.int8, "bfloat16": np.uint16}[dtype]
    assert index.bytes_per_doc == meta["bytes_per_doc"]
    np.testing.assert_array_equal(index.values(), values.astype(np.float32))


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_sharded_search_is_brute_force_on_the_stored_values(tmp_path, dtype):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(83, 2, 8)).astype(np.float32)
  docs = [{"id": f"d{i}", "text": str(i)} for i in range(83)]
  build_index(
    lambda t: x[[int(s) for s in t]], docs, str(tmp_path / "idx"), shard_size=9, dtype=dtype
  )
  # Blocks of 3 rows: 12 rows on each of the 8 devices, 4 blocks each, 13 rows padding.
  index = MemoryIndex.load(str(tmp_path / "idx"), block=3)
  assert index.spec.rows_per_device == 12 and index.matrix.shape == (96, 16)
  assert len(index.matrix.addressable_shards) == 8
  assert (index.scales is not None) == (dtype == "int8")
  stored = decode(encode(x, dtype), dtype).astype(np.float32)
  queries = np.concatenate([x[[5, 80]], rng.normal(size=(3, 2, 8)).astype(np.float32)])
  idx, scores = index.search(queries, top_n=7)
  want, want_scores = _brute_force(stored, queries, 7)
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_allclose(scores, want_scores, atol=2e-6)
  assert idx[0, 0] == 5 and idx[1, 0] == 80 and np.all(idx < 83)
  np.testing.assert_array_equal(index.memories(idx[:2, :3]), stored[idx[:2, :3]])
  # More results than documents: all of them, never a padding row.
  idx, _ = index.search(queries[:1], top_n=500)
  assert sorted(idx[0]) == list(range(83))


def test_the_merge_finds_a_top_n_held_by_one_device():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(64, 2, 8)).astype(np.float32)
  query = rng.normal(size=(1, 2, 8)).astype(np.float32)
  # Rows 16-23 (device 2 of 8, all of its rows) are the query plus growing noise.
  for rank, row in enumerate(range(16, 24)):
    x[row] = query[0] + 0.05 * (rank + 1) * rng.normal(size=(2, 8))
  index = MemoryIndex.from_memories([f"d{i}" for i in range(64)], x, "float32")
  assert index.spec.rows_per_device == 8
  idx, scores = index.search(query, top_n=8)
  want, want_scores = _brute_force(x, query, 8)
  assert sorted(want[0]) == list(range(16, 24))
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_allclose(scores, want_scores, atol=2e-6)


def test_approximate_search_returns_valid_indices():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(300, 2, 8)).astype(np.float32)
  index = MemoryIndex.from_memories([f"d{i}" for i in range(300)], x, "int8")
  queries = x[:4] + 0.1 * rng.normal(size=(4, 2, 8)).astype(np.float32)
  idx, scores = index.search(queries, top_n=5, approx=True, recall_target=0.9)
  assert idx.shape == (4, 5) and np.all((idx >= 0) & (idx < 300))
  assert all(len(set(row)) == 5 for row in idx)
  assert np.all(np.diff(scores, axis=-1) <= 0)
  stored = index.values()
  exact = np.sum(_unit_rows(queries)[:, None] * _unit_rows(stored)[idx], axis=-1)
  np.testing.assert_allclose(scores, exact, atol=2e-6)  # the scores of those documents


def test_an_int8_build_resumes_and_another_dtype_is_not_mixed_in(tmp_path):
  out = str(tmp_path / "idx")
  _interrupt_at_third_shard(out, dtype="int8")
  resumed = []
  build_index(lambda t: fake_compress(t, resumed), DOCS, out, shard_size=10, dtype="int8")
  assert resumed == [10, 7]
  whole = str(tmp_path / "whole")
  build_index(fake_compress, DOCS, whole, shard_size=10, dtype="int8")
  np.testing.assert_array_equal(read_shards(out)[1], read_shards(whole)[1])
  # The same directory built as bfloat16 (no recorded inputs): every shard is redone.
  again = []
  build_index(lambda t: fake_compress(t, again), DOCS, out, shard_size=10, dtype="bfloat16")
  assert again == [10, 10, 10, 7]
  assert MemoryIndex.load(out).dtype == "bfloat16"


def test_an_index_written_before_the_dtype_choice_loads(tmp_path):
  out = str(tmp_path / "idx")
  build_index(fake_compress, DOCS, out, shard_size=10)
  meta_path = tmp_path / "idx" / "index.json"
  meta = json.loads(meta_path.read_text())
  assert meta["dtype"] == "float16"  # still the default
  meta_path.write_text(json.dumps({k: meta[k] for k in ("num_docs", "num_shards", "shard_size")}))
  index = MemoryIndex.load(out)
  assert (index.dtype, index.n_mem, index.hidden) == ("float16", 2, 8)
  assert index.matrix.dtype == np.float16


def test_paired_difference_interval():
  from clara_jax.bench.index import paired_difference

  a = np.array([1] * 90 + [0] * 10, bool)
  same = paired_difference(a, a)
  assert same["difference"] == 0 and same["lower"] < 0 < same["upper"]
  assert same["upper"] < 0.05  # no pair disagrees: a narrow interval
  b = a.copy()
  b[:5] = False  # five pairs only a found
  worse = paired_difference(b, a)
  assert worse["difference"] == -0.05 and worse["lower"] < -0.05 < worse["upper"] < 0
  assert worse["only_b"] == 5 and worse["only_a"] == 0


def test_plan_gives_the_bytes_per_chip_of_a_large_index(capsys):
  assert cli.main(["plan", "--index_docs=33e6"]) == 0
  captured = capsys.readouterr()
  rows = {(r["rate"], r["dtype"]): r for r in json.loads(captured.out)}
  assert set(rows) == {(r, d) for r in (16, 128) for d in STORAGE_DTYPES}
  bf16 = rows[(16, "bfloat16")]  # 16 x 4096 x 2 bytes = 128 KiB per document
  assert bf16["bytes_per_doc"] == 128 * 1024 and bf16["chips"] == 256
  assert bf16["gib_per_chip"] == pytest.approx(-(-33_000_000 // 256) * 128 * 1024 / 2**30)
  assert rows[(128, "int8")]["bytes_per_doc"] == 2 * 4096 + 2 * 4
  assert "GiB per chip" in captured.err
  assert cli.main(["plan", "--index_docs=1e6", "--rates=16,x"]) == 2


# ---------------------------------------------------------------- `clara-jax answer`


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A workdir with the tiny model's export, random weights (as tests/faults builds it:
  nothing to train or compile for the weights)."""
  rng = np.random.default_rng(0)
  tok, cfg, flat = tiny_random_model(rng)
  workdir = tmp_path_factory.mktemp("run")
  write_export(str(workdir / "export"), cfg, flat, tok)
  corpus = workdir / "corpus.jsonl"
  corpus.write_text(
    "".join(
      json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(WORDS, 6))}) + "\n"
      for i in range(12)
    )
  )
  return workdir


def test_answer_from_an_int8_index_end_to_end(tiny_workdir, tmp_path, capsys):
  index = str(tmp_path / "index")
  assert (
    cli.main(
      [
        "index",
        f"--workdir={tiny_workdir}",
        f"--corpus={tiny_workdir}/corpus.jsonl",
        f"--out={index}",
        "--shard_size=5",
        "--dtype=int8",
        "--query=red river?",
        "--query=which coach?",
        "--top_n=3",
      ]
    )
    == 0
  )
  meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert meta["dtype"] == "int8" and meta["num_docs"] == 12 and meta["n_mem"] == 4
  assert [len(r) for r in meta["results"]] == [3, 3] and len(meta["answers"]) == 2
  questions = tmp_path / "q.jsonl"
  questions.write_text(
    '{"question": "red river?", "id": "a"}\n\n'
    '{"question": "which coach?"}\n{"question": "north city?", "id": 7}\n'
    '{"question": "blue team?", "extra": 1}\n'
  )
  out = tmp_path / "answers.jsonl"
  argv = [
    "answer",
    f"--index={index}",
    f"--workdir={tiny_workdir}",
    f"--questions={questions}",
    f"--out={out}",
    "--k=3",
    "--batch=2",
    "--max_new_tokens=3",
  ]
  assert cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["questions"] == 4 and summary["dtype"] == "int8"
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == ["a", "1", "7", "3"]  # two batches of two
  assert [r["question"] for r in rows] == [
    "red river?",
    "which coach?",
    "north city?",
    "blue team?",
  ]
  ids = {f"doc{i}" for i in range(12)}
  for row in rows:
    assert isinstance(row["answer"], str) and set(row["doc_ids"]) <= ids
    assert len(set(row["doc_ids"])) == 3 and row["scores"] == sorted(row["scores"], reverse=True)
  # An existing --out is refused and kept.
  before = out.read_text()
  assert cli.main(argv) == 2
  assert "answers.jsonl: exists" in capsys.readouterr().err and out.read_text() == before
  # Bad questions: the file, the line and the field, before the model loads.
  new = [a if not a.startswith("--out=") else f"--out={tmp_path / 'new.jsonl'}" for a in argv]
  for text, where in (
    ('{"question": "ok?"}\n{"id": "b"}\n', "q.jsonl:2: field 'question': missing"),
    ('{"question": "ok?"}\n{"question": ""}\n', "q.jsonl:2: field 'question': is empty"),
    ('{"question": "ok?"}\n{"question": "x"\n', "q.jsonl:2: invalid JSON"),
    (
      '{"question": "a", "id": 1}\n{"question": "b", "id": "1"}\n',
      "q.jsonl:2: field 'id': duplicate '1'",
    ),
  ):
    questions.write_text(text)
    assert cli.main(new) == 2
    assert where in capsys.readouterr().err
  assert (
    cli.main([a if not a.startswith("--questions=") else "--questions=missing.jsonl" for a in new])
    == 2
  )
  assert "missing.jsonl: no such file" in capsys.readouterr().err
  assert not (tmp_path / "new.jsonl").exists()


@pytest.mark.slow
def test_bench_index_reports_every_dtype_and_the_goals(capsys):
  code = cli.main(["bench", "index", "--docs=3000", "--queries=256", "--repeats=2"])
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result["dtypes"]) == set(STORAGE_DTYPES) and result["devices"] == 8
  assert (result["n_mem"], result["hidden"]) == (16, 64)  # the demo pipeline's memories
  for row in result["dtypes"].values():
    assert {
      "bytes_per_doc",
      "build_docs_per_s",
      "load_s",
      "search_ms",
      "approx_search_ms",
      "recall@5",
    } <= set(row)
  assert set(result["goals"]) == {"int8_recall", "int8_bytes", "search_latency"}
  assert {"difference", "lower", "upper", "top_k_overlap"} <= set(result["int8_vs_float32"])
  assert len(result["plan"]) == 8
  assert out.count("PASS ") + out.count("MISS ") == 3
  assert code == (0 if result["passed"] else 1)


def test_a_search_compiles_once_per_batch_bucket_and_top_n():
  from compile_count import backend_compiles

  rng = np.random.default_rng(4)
  x = rng.normal(size=(40, 2, 8)).astype(np.float32)
  index = MemoryIndex.from_memories([f"d{i}" for i in range(40)], x, "int8")
  index.search(x[:3], top_n=4)
  index.memories(np.zeros((3, 4), np.int32))
  with backend_compiles() as compiled:
    index.search(x[3:7], top_n=4)  # 3 and 4 questions: both padded to 4
    index.search(x[:3], top_n=4)
    index.memories(np.ones((3, 4), np.int32))
  assert compiled == []
  with backend_compiles() as compiled:
    index.search(x[:3], top_n=5)
  assert len(compiled) == 1
