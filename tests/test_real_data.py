"""`clara-jax real-data`: conversion, held-out split and LM text on small hand-written
files in the shared files' layouts (fast, always run) and on the real files (skipped when
../shared/data is absent); the quick pipeline end to end on the real files (slow)."""

import gzip
import json
import os

import pytest

from clara_jax import cli, demo, real_data
from clara_jax.data.formats import validate_row
from report_checks import check_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
ANIMALS = ["otter", "heron", "lynx", "badger", "marten", "ibis", "vole", "newt", "stoat",
           "crane", "shrew", "gecko", "egret", "mink", "kite", "wren", "finch", "hare",
           "moth", "carp", "pike", "tern", "rook", "swift"]


def _hotpot_rows(n):
  """IRCoT HotpotQA rows: 4 paragraphs each, the first two supporting."""
  return [{"question_id": f"h{i}", "question_text": f"Which marsh does the {a} of lake {i} "
           "visit?", "answers_objects": [{"spans": [f"marsh {i}"]}],
           "contexts": [{"id": str(j), "title": f"{a.title()} {j}", "is_supporting": j < 2,
                         "paragraph_text": f"The {a} visits marsh {i + j} in spring."}
                        for j in range(4)]} for i, a in enumerate(ANIMALS[:n])]


def _nq_rows(n):
  return [{"question": f"what does the {a} eat", "answers": [f"food {i}", f"FOOD {i}"],
           "ctxs": [{"title": a.title(), "text": f"The {a} eats food {i} at dawn.",
                     "hasanswer": True, "isgold": True}]}
          for i, a in enumerate(ANIMALS[:n])]


def _pretrain_rows(n):
  return [{"data_type": "qa", "question": [f"Q{i}.{j}?" for j in range(5)],
           "answers": [f"A{i}.{j}" for j in range(5)],
           "docs": [f"Document {i} about the {ANIMALS[i]}.\n It swims."]} for i in range(n)]


def _write(path, rows):
  data = "".join(json.dumps(r) + "\n" for r in rows).encode()
  path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


@pytest.fixture
def small_data(tmp_path):
  data = tmp_path / "shared"
  data.mkdir()
  _write(data / real_data.HOTPOTQA_FILE, _hotpot_rows(12))
  _write(data / real_data.NQ_FILE, _nq_rows(24))
  _write(data / real_data.PRETRAIN_FILE, _pretrain_rows(4))
  plan = real_data.DataPlan(limits={"hotpotqa": None, "nq": None, "pretrain": None},
                            test={"hotpotqa": 3, "nq": 5}, candidates=8, k=2, qa_per_row=2)
  return str(data), str(tmp_path / "work"), plan


def _read(path):
  return real_data.read_jsonl(path)


def test_prepare_data_converts_splits_and_writes_text(small_data):
  data_dir, workdir, plan = small_data
  lines = []
  record = real_data.prepare_data(data_dir, workdir, plan, log=lines.append)
  dirs = real_data.data_dirs(workdir)
  heldout = _read(dirs["heldout"])
  stage2, stage1_2 = (_read(os.path.join(dirs[s], "train.jsonl"))
                      for s in ("stage2", "stage1_2"))
  # Held-out questions: the planned number per set, never trained on in either stage.
  assert sorted(r["kind"] for r in heldout) == ["multi"] * 3 + ["single"] * 5
  test_ids = {r["id"] for r in heldout}
  assert len(stage2) == len(stage1_2) == 12 + 24 - 8
  assert not test_ids & ({r["id"] for r in stage2} | {r["id"] for r in stage1_2})
  for row in heldout + stage2:
    validate_row(row, "stage2", 8)
  for row in stage1_2:
    validate_row(row, "stage1_2", 2)
  # stage1: every QA pair kept, at most qa_per_row per row, the document unchanged.
  stage1 = _read(os.path.join(dirs["stage1"], "train.jsonl"))
  assert len(stage1) == 4 * 3 and all(len(r["question"]) <= 2 for r in stage1)
  assert [q for r in stage1 for q in r["question"]] == [f"Q{i}.{j}?" for i in range(4)
                                                         for j in range(5)]
  # LM text: every distinct passage (held-out questions' too), one per line.
  with open(dirs["lm"]) as f:
    text = f.read().splitlines()
  assert len(text) == len(set(text)) == 12 * 4 + 24 + 4 == record["counts"]["passages"]
  assert "Otter 0 The otter visits marsh 0 in spring." in text
  assert "Document 0 about the otter. It swims." in text
  assert record["counts"]["hotpotqa"] == {"train": 9, "test": 3}
  assert any("converted nq" in line for line in lines)


def test_prepare_data_resumes_and_refuses_another_plan(small_data):
  data_dir, workdir, plan = small_data
  first = real_data.prepare_data(data_dir, workdir, plan, log=lambda _: None)
  lines = []
  assert real_data.prepare_data(data_dir, workdir, plan, log=lines.append) == first
  assert lines == ["[    data] prepared before: kept"]
  other = real_data.DataPlan(**{**plan.__dict__, "seed": 1})
  with pytest.raises(ValueError, match="prepared with another plan"):
    real_data.prepare_data(data_dir, workdir, other)


def test_fitted_prompt_lengths_fit_every_question(small_data):
  from clara_jax.data.features import FeatureConfig, Featurizer
  from clara_jax.data.tokenizer import Tokenizer
  data_dir, workdir, plan = small_data
  real_data.prepare_data(data_dir, workdir, plan, log=lambda _: None)
  dirs = real_data.data_dirs(workdir)
  with open(dirs["lm"]) as f:
    tok = Tokenizer.train(f.read().splitlines(), 400, 4)
  rows = _read(os.path.join(dirs["stage2"], "train.jsonl"))
  lengths = real_data.fitted_prompt_lengths(tok, [r["question"] for r in rows], 4, 2, "short")
  assert lengths["answer"] % 8 == 0 and lengths["stage1"] < lengths["answer"]
  stage2 = Featurizer(tok, FeatureConfig("stage2", n_mem=4, doc_max_length=16, k=2,
                                         num_docs=8, prompt_length=lengths["answer"],
                                         prompt_style="short"))
  assert all(stage2(row)["truncated_gen"] == 0 for row in rows)
  stage1 = Featurizer(tok, FeatureConfig("stage1", n_mem=4, doc_max_length=16,
                                         prompt_length=lengths["stage1"],
                                         prompt_style="short"))
  row = _read(os.path.join(dirs["stage1"], "train.jsonl"))[0]
  assert stage1(row)["gen_tokens"].shape == (lengths["stage1"] + 32,)


def test_split_is_seeded_and_checked():
  rows = [{"id": str(i)} for i in range(10)]
  assert real_data.split_ids(rows, 3, 0) == real_data.split_ids(rows, 3, 0)
  assert real_data.split_ids(rows, 3, 0) != real_data.split_ids(rows, 3, 1)
  with pytest.raises(ValueError, match="cannot hold out 10 of 10"):
    real_data.split_ids(rows, 10, 0)


def test_missing_source_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"hotpotqa_dev500\.jsonl: missing"):
    real_data.prepare_data(str(tmp_path), str(tmp_path / "w"), real_data.data_plan(True))


@pytest.mark.parametrize("quick", [True, False])
def test_recipe_gives_valid_stage_configs(tmp_path, quick):
  from configs.base import validate
  plan = real_data.data_plan(quick)
  dirs = real_data.data_dirs(str(tmp_path))
  recipe = real_data.real_recipe(quick, plan, dirs)
  for stage in demo.PAPER_STAGES:
    config = validate(demo.stage_config(stage, recipe))
    assert config.data.source == dirs["lm" if stage == "lm" else stage]
    assert config.data.candidates == plan.candidates
    assert config.clara.k == (1 if stage == "stage2" else plan.k)


def test_cli_hands_flags_to_run(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(real_data, "run", lambda workdir, data_dir, quick, seed: calls.append(
      (workdir, data_dir, quick, seed)) or {"claims": [{"claim": "x"}]})
  assert cli.main(["real-data", "--quick", "--workdir", str(tmp_path), "--data_dir",
                   "d"]) == 0
  assert calls == [(str(tmp_path), "d", True, 0)]


def test_a_stage_stopped_early_is_not_marked_done(monkeypatch, tmp_path):
  """train() returns without an export on SIGTERM: the stage must resume, not be skipped."""
  from clara_jax.train import loop
  monkeypatch.setattr(loop, "train", lambda config, workdir, progress=None: {})
  recipe = real_data.real_recipe(True, real_data.data_plan(True),
                                 real_data.data_dirs(str(tmp_path)))
  with pytest.raises(demo.StageStopped, match="run the same command again"):
    demo.run_stage("lm", str(tmp_path), recipe, log=lambda _: None)
  assert not os.path.exists(os.path.join(str(tmp_path), "lm", demo.DONE_FILE))


def _shared():
  if not os.path.isdir(SHARED):
    pytest.skip(f"{SHARED} not present")
  return SHARED


def test_real_files_quick_plan(tmp_path):
  record = real_data.prepare_data(_shared(), str(tmp_path), real_data.data_plan(True),
                                  log=lambda _: None)
  counts = record["counts"]
  assert counts["hotpotqa"] == {"train": 32, "test": 8}
  assert counts["nq"] == {"train": 52, "test": 8}
  heldout = _read(real_data.data_dirs(str(tmp_path))["heldout"])
  assert all(len(r["docs"]) == 20 for r in heldout)
  assert {len(r["pos_index"]) for r in heldout if r["kind"] == "multi"} == {2}


# ---------------------------------------------------------------------------------------
# The quick pipeline on the real files (slow: trains every stage).


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  data_dir = _shared()
  workdir = str(tmp_path_factory.mktemp("real_data"))
  lines = []
  summary = real_data.run(workdir, data_dir, quick=True, log=lines.append)
  return workdir, data_dir, summary, lines


@pytest.mark.slow
def test_quick_real_data_run_writes_the_table(quick_run):
  workdir, _, summary, lines = quick_run
  written = check_report(workdir, lines)
  final = written["results"]["stage2"]
  assert final["questions"] == 16
  for key in ("em_normal", "f1_normal", "recall@1", "recall@5", "bm25_recall@1",
              "memory_gain"):
    assert key in final, key
  assert written["data"]["counts"]["heldout"] == 16


@pytest.mark.slow
def test_quick_real_data_rerun_resumes(quick_run):
  workdir, data_dir, summary, _ = quick_run
  lines = []
  again = real_data.run(workdir, data_dir, quick=True, log=lines.append)
  assert "[    data] prepared before: kept" in lines
  assert sum("finished before" in line for line in lines) == len(demo.PAPER_STAGES)
  assert again["results"]["stage2"]["recall@1"] == summary["results"]["stage2"]["recall@1"]
