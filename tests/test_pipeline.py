"""TFDS builders over local JSONL, featurisation per stage, and the grain pipeline:
determinism, exact resumption, per-process slices, global arrays."""

import json
import os

import jax
import numpy as np
import pytest

from clara_jax import partitioning
from clara_jax.data import tfds_builders
from clara_jax.data.features import FeatureConfig, Featurizer, truncation_counts
from clara_jax.data.formats import DataError
from clara_jax.data.pipeline import InputPipeline, to_global_arrays
from clara_jax.data.tokenizer import Tokenizer

WORDS = (
  "alpha beta gamma delta river stone city team blue red north west coach mayor "
  "founded played born year club river valley"
).split()


def _sentence(rng, n):
  return " ".join(rng.choice(WORDS, n)).capitalize() + "."


@pytest.fixture(scope="module")
def tok():
  rng = np.random.default_rng(0)
  corpus = [_sentence(rng, 12) for _ in range(300)] + ["Question: Answer: Background:"]
  return Tokenizer.train(corpus, vocab_size=400, num_mem_tokens=4)


def _stage2_rows(n, n_docs=6, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    docs = [f"Doc {i}-{j}: " + _sentence(rng, 8) for j in range(n_docs)]
    rows.append(
      {
        "question": f"Which doc is {i}?",
        "docs": docs,
        "answer": f"doc {i}",
        "pos_index": [i % n_docs],
      }
    )
  return rows


def _write_split(directory, name, rows):
  directory.mkdir(exist_ok=True)
  (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def stage2_source(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  _write_split(src, "train", _stage2_rows(24))
  _write_split(src, "test", _stage2_rows(5, seed=1))
  builder = tfds_builders.prepare("stage2", str(src), str(tmp_path_factory.mktemp("tfds")))
  return builder


def test_tfds_stage2_round_trip(stage2_source):
  train = stage2_source.as_data_source(split="train")
  assert len(train) == 24 and len(stage2_source.as_data_source(split="test")) == 5
  rows = sorted(
    (tfds_builders.decode_row(train[i]) for i in range(len(train))), key=lambda r: r["question"]
  )
  want = sorted(_stage2_rows(24), key=lambda r: r["question"])
  for got, expected in zip(rows, want):
    assert got["docs"] == expected["docs"] and got["pos_index"] == expected["pos_index"]
    assert got["answer"] == expected["answer"] and got["answers"] == [expected["answer"]]


def test_tfds_bad_row_stops_or_is_skipped(tmp_path):
  src = tmp_path / "src"
  rows = _stage2_rows(4)
  rows[2]["pos_index"] = [9]
  _write_split(src, "train", rows)
  with pytest.raises(DataError, match=r"train.jsonl:3: field 'pos_index'"):
    tfds_builders.prepare("stage2", str(src), str(tmp_path / "strict"))
  builder = tfds_builders.prepare("stage2", str(src), str(tmp_path / "skip"), on_error="skip")
  assert len(builder.as_data_source(split="train")) == 3
  assert builder.reports["train"].rows_skipped == 1
  with pytest.raises(FileNotFoundError, match="no {split}.jsonl"):
    tfds_builders.prepare("stage2", str(tmp_path / "empty"), str(tmp_path / "x"))


def test_a_prepared_dataset_is_not_reused_for_other_inputs(tmp_path):
  from clara_jax.data.fingerprint import StaleArtefact

  src, data_dir = tmp_path / "src", str(tmp_path / "tfds")
  _write_split(src, "train", _stage2_rows(6))
  tfds_builders.prepare("stage2", str(src), data_dir)
  tfds_builders.prepare("stage2", str(src), data_dir)  # the same inputs: reused
  _write_split(src, "train", _stage2_rows(6, seed=4))  # the file rewritten
  with pytest.raises(StaleArtefact, match=r"files.train.sha256.*Remove it to rebuild"):
    tfds_builders.prepare("stage2", str(src), data_dir)
  _write_split(src, "train", _stage2_rows(6))
  with pytest.raises(StaleArtefact, match='on_error: "raise" -> "skip"'):
    tfds_builders.prepare("stage2", str(src), data_dir, on_error="skip")
  moved = tmp_path / "moved"
  os.rename(src, moved)  # the same bytes elsewhere are the same input
  assert (
    len(tfds_builders.prepare("stage2", str(moved), data_dir).as_data_source(split="train")) == 6
  )


def test_stage1_and_stage1_2_builders(tmp_path, tok):
  src1, src12 = tmp_path / "s1", tmp_path / "s12"
  _write_split(
    src1,
    "train",
    [
      {
        "data_type": "qa",
        "question": ["Who?", "Where?"],
        "answers": ["A", "B"],
        "docs": ["Alpha beta."],
      },
      {
        "data_type": "paraphrase",
        "question": "",
        "answers": ["Beta alpha."],
        "docs": ["Alpha beta."],
      },
    ],
  )
  _write_split(
    src12, "train", [{"question": "Q?", "docs": ["d one", "d two", "d three"], "answer": "one"}]
  )
  b1 = tfds_builders.prepare("stage1", str(src1), str(tmp_path / "t1"))
  b12 = tfds_builders.prepare("stage1_2", str(src12), str(tmp_path / "t12"), num_docs=3)
  feat1 = Featurizer(
    tok, FeatureConfig("stage1", n_mem=2, doc_max_length=16, prompt_length=96, answer_length=24)
  )
  for i in range(2):
    ex = feat1(tfds_builders.decode_row(b1.as_data_source(split="train")[i]), i)
    assert ex["doc_tokens"].shape == (1, 16 + 3 + 2)
    assert ex["slot_positions"].shape == (2,)
    answer = tok.decode(ex["gen_tokens"][96:][ex["answer_mask"] == 1])
    assert answer.startswith("Question: Who?") or answer.startswith("Beta alpha.")
  feat12 = Featurizer(
    tok,
    FeatureConfig(
      "stage1_2", n_mem=2, k=3, num_docs=3, doc_max_length=8, prompt_length=96, answer_length=8
    ),
  )
  ex = feat12(tfds_builders.decode_row(b12.as_data_source(split="train")[0]), 0)
  assert ex["doc_tokens"].shape == (3, 8 + 3 + 2) and ex["slot_positions"].shape == (6,)
  assert tok.decode(ex["gen_tokens"][96:][ex["answer_mask"] == 1]).strip() == "one"


FEATURES = FeatureConfig(
  "stage2",
  n_mem=2,
  doc_max_length=12,
  question_max_length=40,
  k=2,
  num_docs=6,
  prompt_length=80,
  answer_length=8,
)


def test_stage2_features(stage2_source, tok):
  row = _stage2_rows(1)[0]
  ex = Featurizer(tok, FEATURES)(row, 0)
  assert ex["doc_tokens"].shape == (6, 12 + 3 + 2)
  assert ex["q_tokens"].shape == (40 + 3 + 2,)
  np.testing.assert_array_equal(ex["positives"], [1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(ex["gen_tokens"][ex["slot_positions"]], tok.mem_ids[:2] * 2)
  assert tok.decode(ex["gen_tokens"][80:][ex["answer_mask"] == 1]).strip() == "doc 0"
  # Documents are 8 words + a prefix: longer than 12 tokens, so truncated and counted.
  assert ex["truncated_docs"] == 6 and ex["truncated_question"] == 0
  doc0 = tok.decode(ex["doc_tokens"][0][ex["doc_mask"][0] == 1])
  assert doc0.startswith("<ENC>") and doc0.endswith("<MEM0><MEM1>")
  with pytest.raises(ValueError, match="n_mem=5"):
    Featurizer(tok, FeatureConfig("stage2", n_mem=5))


def _pipeline(source, tok, **kw):
  args = dict(global_batch=4, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return InputPipeline(source, Featurizer(tok, FEATURES), **args)


def test_pipeline_is_deterministic_and_resumes_exactly(stage2_source, tok):
  source = stage2_source.as_data_source(split="train")
  a, b = _pipeline(source, tok), _pipeline(source, tok)
  batches = [next(a) for _ in range(8)]  # 24 rows / 4 = 6 per epoch: crosses an epoch
  for batch in batches:
    other = next(b)
    for key in batch:
      np.testing.assert_array_equal(batch[key], other[key])
  epoch0 = np.concatenate([x["q_tokens"] for x in batches[:6]])
  assert len({r.tobytes() for r in epoch0}) == 24  # each row once per epoch
  first_epoch2 = batches[6]["q_tokens"]
  assert not np.array_equal(first_epoch2, batches[0]["q_tokens"])  # re-shuffled
  assert truncation_counts(batches[0])["truncated_docs"] == 4 * 6

  c = _pipeline(source, tok)
  for _ in range(3):
    next(c)
  state = json.loads(json.dumps(c.get_state()))  # checkpointable as JSON
  resumed = _pipeline(source, tok)
  resumed.set_state(state)
  for i in range(3, 8):
    np.testing.assert_array_equal(next(resumed)["doc_tokens"], batches[i]["doc_tokens"])
  other_seed = next(_pipeline(source, tok, seed=1))
  assert not np.array_equal(other_seed["q_tokens"], batches[0]["q_tokens"])


def test_pipeline_slices_rows_per_process(stage2_source, tok):
  source = stage2_source.as_data_source(split="train")
  single = _pipeline(source, tok, global_batch=4)
  halves = [
    _pipeline(source, tok, global_batch=4, process_index=p, process_count=2) for p in range(2)
  ]
  assert halves[0].local_batch == 2
  seen = [set(), set()]
  for _ in range(6):  # one epoch
    whole = next(single)
    parts = [next(h) for h in halves]
    for key in whole:  # the two local batches assemble into the single-process batch
      np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), whole[key])
    for p in range(2):
      seen[p] |= {r.tobytes() for r in parts[p]["q_tokens"]}
  assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]
  with pytest.raises(ValueError, match="not divisible"):
    _pipeline(source, tok, global_batch=5, process_count=2)


def test_global_arrays_on_a_mesh(stage2_source, tok):
  pipe = _pipeline(stage2_source.as_data_source(split="train"), tok, global_batch=8)
  local = next(pipe)
  mesh = partitioning.make_mesh((-1, 1, 1))
  batch = to_global_arrays(local, mesh)
  assert batch["doc_tokens"].shape == local["doc_tokens"].shape
  assert len(batch["doc_tokens"].addressable_shards) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(batch["q_tokens"]), local["q_tokens"])


def test_replay_featurizer_adds_one_line_of_lm_text_per_example(tok):
  from clara_jax.data.features import ReplayFeaturizer

  lm_cfg = FeatureConfig("lm", lm_length=24)
  inner = Featurizer(
    tok, FeatureConfig("stage1", n_mem=2, doc_max_length=16, prompt_length=96, answer_length=24)
  )
  lines = ["the first line of text", "the second line", "a third one"]
  replay = ReplayFeaturizer(inner, lines, Featurizer(tok, lm_cfg))
  row = {"data_type": "qa", "question": ["who?"], "answers": ["me"], "docs": ["a doc"]}
  for index in (0, 4):
    example = replay(row, index)
    plain = inner(row, index)
    assert all(np.array_equal(example[k], v) for k, v in plain.items())
    want = Featurizer(tok, lm_cfg)({"text": lines[index % 3]})
    np.testing.assert_array_equal(example["replay_tokens"], want["tokens"])
    np.testing.assert_array_equal(example["replay_mask"], want["mask"])
  with pytest.raises(ValueError, match="no lines"):
    ReplayFeaturizer(inner, [], Featurizer(tok, lm_cfg))
  with pytest.raises(ValueError, match="lm stage"):
    ReplayFeaturizer(inner, lines, inner)
