"""The generated world: reproducible, valid in every format, gold where pos_index says,
multi-hop questions whose clue words only the answer document has (so BM25 misses it),
held-out questions on known documents, and fresh worlds that never repeat a fact."""

import itertools
import json
import os

import numpy as np
import pytest

from clara_jax.data import synth
from clara_jax.data.bm25 import BM25
from clara_jax.data.formats import read_rows
from tests.python_process import run_python


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("world"))
  synth.write_world(
    directory, seed=5, size="tiny", candidates=20, k=5, fresh_rows=30, world="classic"
  )
  return directory


def _manifest(directory):
  with open(os.path.join(directory, "manifest.json")) as f:
    return json.load(f)


def _corpus(directory):
  with open(os.path.join(directory, "corpus.jsonl")) as f:
    return {r["id"]: r["text"] for r in map(json.loads, f)}


def _raw_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_same_seed_same_bytes_other_seed_other_world(world_dir, tmp_path):
  """Byte-identical in other processes too, whatever their string-hash seed (set order)."""
  for hash_seed in ("1", "2"):
    again = str(tmp_path / f"again{hash_seed}")
    code = (
      "from clara_jax.data import synth; synth.write_world("
      f"{again!r}, seed=5, size='tiny', candidates=20, k=5, fresh_rows=30, "
      "world='classic')"
    )
    proc = run_python("-c", code, timeout=300, PYTHONHASHSEED=hash_seed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in sorted(os.listdir(world_dir)):
      with (
        open(os.path.join(world_dir, name), "rb") as a,
        open(os.path.join(again, name), "rb") as b,
      ):
        assert a.read() == b.read(), (name, hash_seed)
  other = synth.make_world(6, "tiny")
  names = {e.name for e in synth.make_world(5, "tiny").docs()}
  assert not names & {e.name for e in other.docs()}


def test_every_file_reads_back_in_its_format(world_dir):
  manifest = _manifest(world_dir)
  for split in ("train", "test"):
    for fmt in ("stage1", "stage1_2", "stage2"):
      path = os.path.join(world_dir, f"{fmt}_{split}.jsonl")
      rows = list(read_rows(path, fmt))
      assert len(rows) == manifest["files"][f"{fmt}_{split}.jsonl"] > 0
  stage2 = list(read_rows(os.path.join(world_dir, "stage2_train.jsonl"), "stage2", num_docs=20))
  assert stage2 and all(len(r["pos_index"]) == 1 for r in stage2)
  stage1 = list(read_rows(os.path.join(world_dir, "stage1_train.jsonl"), "stage1"))
  kinds = {r["data_type"] for r in stage1}
  assert kinds == {"qa", "paraphrase"}
  for row in stage1:
    if row["data_type"] == "paraphrase":
      assert row["answers"][0] != row["docs"][0]
  text = open(os.path.join(world_dir, "lm.txt")).read().splitlines()
  assert len(text) == manifest["files"]["lm.txt"] > 100


def test_gold_document_holds_the_answer_at_pos_index(world_dir):
  manifest, corpus = _manifest(world_dir), _corpus(world_dir)
  for split in ("train", "test"):
    for row in _raw_rows(os.path.join(world_dir, f"stage2_{split}.jsonl")):
      q = manifest["questions"][row["id"]]
      assert q["split"] == split
      gold_text = corpus[q["gold"]]
      assert row["docs"][row["pos_index"][0]] == gold_text
      assert row["answer"] in gold_text
      assert row["docs"].count(gold_text) == 1
      if q["bridge"]:  # the person the question names is a (hard) distractor
        assert corpus[q["bridge"]] in row["docs"]


def test_multi_hop_clues_are_in_the_gold_document_not_the_question(world_dir):
  manifest, corpus = _manifest(world_dir), _corpus(world_dir)
  multi = [q for q in manifest["questions"].values() if q["kind"] == "multi"]
  assert len(multi) > 50
  for q in multi:
    words = set(synth._words(q["question"]))
    gold_words = set(synth._words(corpus[q["gold"]]))
    clues = {c.lower() for c in q["clues"]}
    assert clues, q
    assert not clues & words
    assert clues <= gold_words
    assert q["bridge"] != q["gold"]


def test_bm25_finds_single_hop_gold_but_not_multi_hop(world_dir):
  """The world is built so that multi-hop is BM25's weak spot (the demo's point b)."""
  manifest = _manifest(world_dir)
  hits = {"single": [], "multi": []}
  for row in _raw_rows(os.path.join(world_dir, "stage2_train.jsonl")):
    scores = BM25(row["docs"]).scores(row["question"])
    top = int(np.argmax(scores))
    hits[manifest["questions"][row["id"]]["kind"]].append(top == row["pos_index"][0])
  single, multi = np.mean(hits["single"]), np.mean(hits["multi"])
  assert single > 0.6, single
  assert multi < 0.15, multi


def test_test_questions_are_new_but_their_documents_are_not(world_dir):
  manifest = _manifest(world_dir)
  train = [q for q in manifest["questions"].values() if q["split"] == "train"]
  test = [q for q in manifest["questions"].values() if q["split"] == "test"]
  assert 0.1 < len(test) / (len(train) + len(test)) < 0.35
  assert {q["kind"] for q in test} == {"single", "multi"}
  train_text = {q["question"] for q in train}
  train_gold = {q["gold"] for q in train}
  for q in test:
    assert q["question"] not in train_text
    assert q["gold"] in train_gold
  stage1_train = " ".join(
    " ".join(r["question"])
    for r in read_rows(os.path.join(world_dir, "stage1_train.jsonl"), "stage1")
  )
  for q in test:
    if q["kind"] == "single":
      assert q["question"] not in stage1_train


def test_max_facts_makes_shorter_documents():
  full = synth.make_world(1, "tiny")
  short = synth.make_world(1, "tiny", max_facts=2)
  assert max(len(e.facts) for e in short.docs()) == 2
  mean = lambda w: np.mean([len(e.text.split()) for e in w.docs()])
  assert mean(short) < 0.8 * mean(full)
  for q in short.questions:  # every question still answerable from its gold
    assert q.answer in short.entities[q.gold].text


def test_fresh_worlds_stream_new_names_and_reproduce():
  a = list(itertools.islice(synth.iter_fresh_rows(0, "stage1"), 200))
  b = list(itertools.islice(synth.iter_fresh_rows(0, "stage1"), 200))
  assert a == b
  worlds = [
    synth.make_world(synth._fresh_seed(0, 10_000 + i), "tiny", test_share=0.0) for i in range(3)
  ]
  names = [{e.name for e in w.docs()} for w in worlds]
  assert not names[0] & names[1] and not names[1] & names[2]
  docs = [r["docs"][0] for r in a]
  assert len(set(docs)) > 60  # 200 rows span several worlds (42 documents each)
  fixed = {e.text for e in synth.make_world(0, "tiny").docs()}
  assert not fixed & set(docs)


def test_fresh_stage2_rows_have_all_candidates_and_their_gold():
  rows = list(itertools.islice(synth.iter_fresh_rows(0, "stage2", k=1, candidates=6), 80))
  assert all(len(r["docs"]) == 6 and r["pos_index"] for r in rows)
  for r in rows:
    synth.validate_row(r, "stage2")
  fixed = {e.text for e in synth.make_world(0, "tiny").docs()}
  assert not fixed & {d for r in rows for d in r["docs"]}


def test_pool_names_are_single_pieces_rebound_by_every_world():
  from clara_jax.data.tokenizer import Tokenizer

  pool = {w for words in synth.name_pool().values() for w in words}
  assert len(pool) == sum(synth._POOL_SIZES.values())  # distinct words
  worlds = [
    synth.make_world(synth._fresh_seed(0, 10_000 + i), "small", max_facts=2, names="pool")
    for i in range(2)
  ]
  for world in worlds:
    for e in world.docs():
      words = e.name.split()
      assert words[0] in pool and (e.kind in ("team", "company") or words[-1] in pool)
  # Same names, new facts: only reading the document tells a world's answers.
  facts = [{(e.name, a, v) for e in w.docs() for a, v in e.facts.items()} for w in worlds]
  names = [{e.name for e in w.docs() if e.kind == "city"} for w in worlds]
  assert names[0] & names[1] and len(facts[0] & facts[1]) < 0.1 * len(facts[0])
  lines = synth.lm_text(worlds[0], fresh_worlds=1, size="small", max_facts=2)
  tok = Tokenizer.train(lines, 1024, 4, user_symbols=synth.pool_symbols())
  pieces = lambda t, word: len(t.encode("of " + word)) - len(t.encode("of"))
  for e in worlds[1].docs():
    for word in e.name.split():
      if word in pool:
        assert pieces(tok, word) == 1, word
  plain = Tokenizer.train(lines, 1024, 4)
  assert sum(pieces(plain, w) for w in pool) > 1.5 * len(pool)
  with pytest.raises(ValueError, match="unknown names"):
    synth.make_world(0, "tiny", names="nicknames")


def test_too_many_candidates_is_a_clear_error():
  world = synth.make_world(0, "tiny")
  with pytest.raises(ValueError, match="candidates requested"):
    synth.stage_rows(world, "train", candidates=500)


def test_clues_for_reads_the_manifest(world_dir):
  manifest = _manifest(world_dir)
  multi = next(q for q in manifest["questions"].values() if q["kind"] == "multi")
  clues = synth.clues_for(
    os.path.join(world_dir, "manifest.json"), [multi["question"], "not a question of this world"]
  )
  assert clues == [multi["clues"], []]


def _synth_cli(*args: str) -> str:
  """Runs `clara-jax synth ARGS` in a fresh process; its stdout (it must succeed)."""
  proc = run_python("-m", "clara_jax.cli", "synth", *args)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def test_cli_writes_a_world_and_a_stream(tmp_path):
  out = tmp_path / "w"
  stdout = _synth_cli(
    "--out", str(out), "--seed", "2", "--size", "tiny", "--candidates", "10", "--names", "pool"
  )
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["files"]["stage2_test.jsonl"] > 0 and summary["names"] == "pool"
  rows = list(read_rows(str(out / "stage2_test.jsonl"), "stage2", num_docs=10))
  assert len(rows) == summary["files"]["stage2_test.jsonl"]
  stream = tmp_path / "fresh.jsonl"
  _synth_cli("--out", str(stream), "--stream", "stage1_2", "--rows", "25")
  assert len(list(read_rows(str(stream), "stage1_2"))) == 25
