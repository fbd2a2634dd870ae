"""`clara-jax real-data`: conversion, held-out split and LM text on small hand-written
files in the shared files' layouts (fast, always run) and on the real files (skipped when
the data directory is absent); the quick pipeline end to end on the real files (slow)."""

import dataclasses
import gzip
import json
import os

import pytest
from report_checks import check_report

from clara_jax import cli
from clara_jax.data.formats import validate_row
from clara_jax.pipeline import real_data, run, stages
from clara_jax.pipeline import recipe as recipe_lib
from tests.qa_fixtures import ANIMALS, shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hotpot_rows(n):
  """IRCoT HotpotQA rows: 4 paragraphs each, the first two supporting."""
  return [
    {
      "question_id": f"h{i}",
      "question_text": f"Which marsh does the {a} of lake {i} visit?",
      "answers_objects": [{"spans": [f"marsh {i}"]}],
      "contexts": [
        {
          "id": str(j),
          "title": f"{a.title()} {j}",
          "is_supporting": j < 2,
          "paragraph_text": f"The {a} visits marsh {i + j} in spring.",
        }
        for j in range(4)
      ],
    }
    for i, a in enumerate(ANIMALS[:n])
  ]


def _nq_rows(n):
  return [
    {
      "question": f"what does the {a} eat",
      "answers": [f"food {i}", f"FOOD {i}"],
      "ctxs": [
        {
          "title": a.title(),
          "text": f"The {a} eats food {i} at dawn.",
          "hasanswer": True,
          "isgold": True,
        }
      ],
    }
    for i, a in enumerate(ANIMALS[:n])
  ]


def _pretrain_rows(n):
  return [
    {
      "data_type": "qa",
      "question": [f"Q{i}.{j}?" for j in range(5)],
      "answers": [f"A{i}.{j}" for j in range(5)],
      "docs": [f"Document {i} about the {ANIMALS[i]}.\n It swims."],
    }
    for i in range(n)
  ]


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
  plan = real_data.DataPlan(
    limits={"hotpotqa": None, "nq": None, "pretrain": None},
    test={"hotpotqa": 3, "nq": 5},
    candidates=8,
    k=2,
    qa_per_row=2,
  )
  return str(data), str(tmp_path / "work"), plan


def _read(path):
  return real_data.read_jsonl(path)


def test_prepare_data_converts_splits_and_writes_text(small_data):
  data_dir, workdir, plan = small_data
  lines = []
  record = real_data.prepare_data(data_dir, workdir, plan, log=lines.append)
  dirs = real_data.data_dirs(workdir)
  heldout = _read(dirs["heldout"])
  stage2, stage1_2 = (_read(os.path.join(dirs[s], "train.jsonl")) for s in ("stage2", "stage1_2"))
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
  assert [q for r in stage1 for q in r["question"]] == [
    f"Q{i}.{j}?" for i in range(4) for j in range(5)
  ]
  # LM text: every distinct passage (held-out questions' too), one per line.
  with open(dirs["lm"]) as f:
    text = f.read().splitlines()
  assert len(text) == len(set(text)) == 12 * 4 + 24 + 4 == record["counts"]["passages"]
  assert "Otter 0 The otter visits marsh 0 in spring." in text
  assert "Document 0 about the otter. It swims." in text
  assert record["counts"]["hotpotqa"] == {"train": 9, "test": 3}
  assert any("converted nq" in line for line in lines)


def test_prepare_data_restates_each_stage1_document_once(small_data):
  import dataclasses

  data_dir, workdir, plan = small_data
  real_data.prepare_data(
    data_dir, workdir, dataclasses.replace(plan, restate_stage1=True), log=lambda _: None
  )
  stage1 = _read(os.path.join(real_data.data_dirs(workdir)["stage1"], "train.jsonl"))
  qa = [r for r in stage1 if r["data_type"] == "qa"]
  restated = [r for r in stage1 if r["data_type"] == "paraphrase"]
  assert len(qa) == 4 * 3 and len(restated) == 4  # 4 documents, 3 QA rows each
  assert [r["docs"][0] for r in restated] == list(dict.fromkeys(r["docs"][0] for r in qa))
  assert all(r["answers"] == r["docs"] and r["question"] == [] for r in restated)


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
  stage2 = Featurizer(
    tok,
    FeatureConfig(
      "stage2",
      n_mem=4,
      doc_max_length=16,
      k=2,
      num_docs=8,
      prompt_length=lengths["answer"],
      prompt_style="short",
    ),
  )
  assert all(stage2(row)["truncated_gen"] == 0 for row in rows)
  stage1 = Featurizer(
    tok,
    FeatureConfig(
      "stage1", n_mem=4, doc_max_length=16, prompt_length=lengths["stage1"], prompt_style="short"
    ),
  )
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
    real_data.prepare_data(
      str(tmp_path), str(tmp_path / "w"), real_data.data_plan(recipe_lib.load("real_tiny", True))
    )


@pytest.mark.parametrize("quick", [True, False])
def test_pretrained_recipe_gives_valid_stage_configs(tmp_path, quick):
  from configs.base import validate

  plan = real_data.data_plan(recipe_lib.load("real_pretrained", quick))
  assert (
    plan.nq_stage1
    and plan.restate_stage1
    and plan.test == ({"hotpotqa": 8, "nq": 8} if quick else {"hotpotqa": 100, "nq": 100})
  )
  dirs = real_data.data_dirs(str(tmp_path))
  recipe = real_data.with_run_values(
    recipe_lib.load("real_pretrained", quick), plan, dirs, "smollm2"
  )
  assert "lm" not in recipe.stages and recipe.base == "import"  # imported, not trained
  for stage in recipe.train:
    config = validate(recipe_lib.stage_config(stage, recipe))
    assert config.data.source == dirs[stage]
    assert not config.clara.train_base and config.clara.k == plan.k
    cache = real_data.memory_cache_dir(str(tmp_path))
    assert config.data.memory_cache == (cache if stage == "stage2" else "")
    assert config.data.prompt_style == "reference"
    # The generator reads memories in every stage as stage1 trained them.
    assert config.clara.memory_scale == "embedding"
    assert (config.clara.lexical_weight, config.clara.mse_weight) == (1.0, 0.0)
  assert recipe_lib.stage_config("stage1", recipe).optimizer.lr == 3e-3


@pytest.mark.parametrize("quick", [True, False])
def test_recipe_gives_valid_stage_configs(tmp_path, quick):
  from configs.base import validate

  recipe = recipe_lib.load("real_tiny", quick)
  plan = real_data.data_plan(recipe)
  dirs = real_data.data_dirs(str(tmp_path))
  recipe = real_data.with_run_values(recipe, plan, dirs)
  assert recipe.train == ("lm", "stage1", "stage1_2", "stage2")
  for stage in recipe.train:
    config = validate(recipe_lib.stage_config(stage, recipe))
    assert config.data.source == dirs["lm" if stage == "lm" else stage]
    assert config.data.candidates == plan.candidates
    assert config.clara.k == (1 if stage == "stage2" else plan.k)


def test_cli_hands_flags_to_run(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(
    run,
    "run",
    lambda recipe, workdir, quick, seed, data_dir, base: calls.append(
      (recipe, workdir, data_dir, quick, seed, base)
    )
    or {"claims": [{"claim": "x"}]},
  )
  w = str(tmp_path)
  assert cli.main(["real-data", "--quick", "--workdir", w, "--data_dir", "d"]) == 0
  assert cli.main(["real-data", "--workdir", w, "--data_dir", "d", "--base", "smollm2"]) == 0
  assert cli.main(["demo", "--workdir", w, "--seed", "3"]) == 0
  recipe_dir = os.path.join(ROOT, "configs", "recipes", "real_tiny")
  assert cli.main(["pipeline", "--recipe", recipe_dir, "--workdir", w, "--data_dir", "d"]) == 0
  assert calls == [
    ("real_tiny", w, "d", True, 0, None),
    ("real_pretrained", w, "d", False, 0, "smollm2"),
    ("demo", w, None, False, 3, None),
    (recipe_dir, w, "d", False, 0, None),
  ]


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--recipe", "real_tiny"], "recipe 'real_tiny' reads the real QA files: give --data_dir"),
    (["--recipe", "real_pretrained", "--data_dir", "d"], "give --base"),
    (["--recipe", "demo", "--base", "smollm2"], "trains its base (`lm`): --base is not used"),
    (["--recipe", "demo", "--data_dir", "d"], "generates its world: --data_dir is not used"),
    (["--recipe", "nope"], "recipe 'nope': neither a directory with a recipe.py nor one of"),
    (["--recipe", "real_tiny", "--seeds", "1,2", "--data_dir", "d"], "generated world only"),
  ],
)
def test_pipeline_refuses_flags_its_recipe_cannot_use(argv, message, tmp_path, capsys):
  """Checked before anything is written: exit 2, one line naming the flag."""
  workdir = tmp_path / "w"
  assert cli.main(["pipeline", "--workdir", str(workdir), *argv]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not workdir.exists() or not any(workdir.iterdir())


def test_a_recipe_directory_outside_the_package_runs_as_its_copy(tmp_path):
  """A recipe is a directory: a copy of real_tiny's elsewhere loads as the same recipe,
  and a declaration it gets wrong is an error naming the file."""
  import shutil

  copy = tmp_path / "my_recipe"
  shutil.copytree(os.path.join(ROOT, "configs", "recipes", "real_tiny"), copy)
  mine, theirs = recipe_lib.load(str(copy), quick=True), recipe_lib.load("real_tiny", quick=True)
  assert mine == dataclasses.replace(theirs, name="my_recipe")
  recipe_file = copy / "recipe.py"
  recipe_file.write_text(recipe_file.read_text() + '\nEVALUATION = "vibes"\n')
  with pytest.raises(ValueError, match=r"my_recipe/recipe.py: EVALUATION = 'vibes'"):
    recipe_lib.load(str(copy))


def test_a_stage_stopped_early_is_not_marked_done(monkeypatch, tmp_path):
  """train() returns without an export on SIGTERM: the stage must resume, not be skipped."""
  from clara_jax.train import loop

  monkeypatch.setattr(loop, "train", lambda config, workdir, progress=None: {})
  recipe = recipe_lib.load("real_tiny", True)
  recipe = real_data.with_run_values(
    recipe, real_data.data_plan(recipe), real_data.data_dirs(str(tmp_path))
  )
  with pytest.raises(stages.StageStopped, match="run the same command again"):
    stages.run_stage("lm", str(tmp_path), recipe, log=lambda _: None)
  assert not os.path.exists(os.path.join(str(tmp_path), "lm", stages.DONE_FILE))


def test_real_files_quick_plan(tmp_path):
  record = real_data.prepare_data(
    shared_path(),
    str(tmp_path),
    real_data.data_plan(recipe_lib.load("real_tiny", True)),
    log=lambda _: None,
  )
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
  data_dir = shared_path()
  workdir = str(tmp_path_factory.mktemp("real_data"))
  lines = []
  summary = run.run("real_tiny", workdir, quick=True, data_dir=data_dir, log=lines.append)
  return workdir, data_dir, summary, lines


@pytest.mark.slow
def test_quick_real_data_run_writes_the_table(quick_run):
  workdir, _, summary, lines = quick_run
  written = check_report(workdir, lines)
  final = written["results"]["stage2"]
  assert final["questions"] == 16
  for key in ("em_normal", "f1_normal", "recall@1", "recall@5", "bm25_recall@1", "memory_gain"):
    assert key in final, key
  assert written["data"]["counts"]["heldout"] == 16


@pytest.mark.slow
def test_quick_real_data_rerun_resumes(quick_run):
  workdir, data_dir, summary, _ = quick_run
  lines = []
  again = run.run("real_tiny", workdir, quick=True, data_dir=data_dir, log=lines.append)
  assert "[    data] prepared before: kept" in lines
  assert sum("finished before" in line for line in lines) == 4
  assert again["results"]["stage2"]["recall@1"] == summary["results"]["stage2"]["recall@1"]


# ---------------------------------------------------------------------------------------
# The pretrained-base pipeline, quick, on a tiny random GGUF base and hand-written files
# (fast: always run).


def _pretrained_inputs(root, hotpot):
  """(data directory of hand-written source files, tiny random GGUF base) under root."""
  from gguf_fixtures import write_tiny_gguf

  data = root / "shared"
  data.mkdir()
  _write(data / real_data.HOTPOTQA_FILE, _hotpot_rows(hotpot))
  _write(data / real_data.NQ_FILE, _nq_rows(24))
  _write(data / real_data.PRETRAIN_FILE, _pretrain_rows(4))
  return data, write_tiny_gguf(str(root / "base.gguf"))


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  data, base = _pretrained_inputs(root, hotpot=20)
  workdir = str(root / "work")
  lines = []
  summary = run.run(
    "real_pretrained", workdir, quick=True, data_dir=str(data), base=base, log=lines.append
  )
  return workdir, str(data), base, summary, lines


REAL_CLAIMS = (
  "a. memory gain vs a wrong candidate",
  "a. memory gain vs no memories",
  "a. EM closed book / retrieved / gold memories",
  "a. F1 gold memories - closed",
  "b. all R@5 stage2 - init reasoner",
  "b. all R@1 stage2 - BM25",
  "b. single R@5 stage2 - random",
  "b. multi R@1 stage2 - init reasoner",
  "c. lens AUC stage2 - permutation null",
  "c. lens AUC stage2 - init reasoner",
)


def test_a_pretrained_base_runs_every_stage_and_reports(pretrained_run):
  workdir, _, base, summary, lines = pretrained_run
  claims = [c["claim"] for c in summary["claims"]]
  for prefix in REAL_CLAIMS:
    assert any(c.startswith(prefix) for c in claims), prefix
  assert summary["base"] == base and summary["stages"]["lm"]["imported"] == base
  assert any("base.gguf imported" in line and "chat format chatml" in line for line in lines)
  # The imported base is stage1's start; its tokenizer is the GGUF's plus CLaRa's tokens.
  from clara_jax.data.tokenizer import load_tokenizer

  tok = load_tokenizer(os.path.join(workdir, "stage2", "export"), 8)
  assert tok.chat_format == "chatml" and tok.base_vocab_size == 269
  with open(os.path.join(workdir, "stage1", "run_config.json")) as f:
    assert "../lm" in f.read()
  # Held out: 8 + 8 questions, never in a training file (stage1 included).
  dirs = real_data.data_dirs(workdir)
  heldout = _read(dirs["heldout"])
  questions = {r["question"] for r in heldout}
  assert len(heldout) == 16 and summary["results"]["questions"] == 8  # 4 per set
  for stage in ("stage1", "stage1_2", "stage2"):
    for row in _read(os.path.join(dirs[stage], "train.jsonl")):
      asked = row["question"] if isinstance(row["question"], list) else [row["question"]]
      assert not questions & set(asked), stage
  # stage1 reads the NQ training questions' gold passages beside the pretraining rows,
  # and a restatement of each document.
  stage1 = _read(os.path.join(dirs["stage1"], "train.jsonl"))
  qa = [r for r in stage1 if r["data_type"] == "qa"]
  assert sum(r["docs"][0].endswith("at dawn.") for r in qa) == 24 - 8
  assert sorted(r["docs"][0] for r in stage1 if r["data_type"] == "paraphrase") == sorted(
    {r["docs"][0] for r in qa}
  )
  # stage2 read every candidate's memory from the cache of the stage1_2 compressor.
  from clara_jax.train.memory_cache import CACHE_FILE

  with open(os.path.join(workdir, "memories", CACHE_FILE)) as f:
    cache = json.load(f)
  docs = {
    d
    for path in (os.path.join(dirs["stage2"], "train.jsonl"), dirs["heldout"])
    for r in _read(path)
    for d in r["docs"]
  }
  assert cache["num_docs"] == len(docs) and cache["n_mem"] == 8
  with open(os.path.join(workdir, "stage2", "run_config.json")) as f:
    assert os.path.join(workdir, "memories") in f.read()
  with open(os.path.join(workdir, "examples.md")) as f:
    assert f.read().count("\n## ") >= 8
  for name in ("stage2.jsonl", "stage1_2_init.jsonl", "lens_stage2.jsonl", "real.json"):
    assert os.path.exists(os.path.join(workdir, "eval", name)), name
  stage2 = _read(os.path.join(workdir, "eval", "stage2.jsonl"))
  assert all("prediction_closed_book" in r and "em_closed_book" in r for r in stage2)


def test_a_pretrained_run_resumes_and_refuses_a_stale_cache(pretrained_run):
  workdir, data_dir, base, summary, _ = pretrained_run
  lines = []
  again = run.run(
    "real_pretrained", workdir, quick=True, data_dir=data_dir, base=base, log=lines.append
  )
  assert "[      lm] imported before: skipped" in lines
  assert "[  memory] cached before: kept" in lines
  assert sum("finished before" in line for line in lines) == 3
  assert again["results"]["paired"] == summary["results"]["paired"]
  from clara_jax.infer.api import ClaraModel
  from clara_jax.train.memory_cache import MemoryCache, StaleMemoryCache

  cache = MemoryCache(os.path.join(workdir, "memories"))
  ClaraModel.load(os.path.join(workdir, "stage2", "export")).use_memory_cache(cache)
  with pytest.raises(StaleMemoryCache, match="another compressor"):
    ClaraModel.load(os.path.join(workdir, "stage1", "export")).use_memory_cache(cache)


def test_an_unknown_base_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="--base 'llama9': neither a known base"):
    real_data.import_base("llama9", str(tmp_path), 8, log=lambda _: None)


def test_the_stage1_study_trains_without_its_dev_rows_and_measures_them(tmp_path):
  """`clara_jax.eval.stage1_study` on the tiny GGUF base: stage1 trains on the pool minus
  the dev rows, and the dev rows' memory gain and spread are measured and written."""
  from clara_jax.eval import stage1_study

  data, base = _pretrained_inputs(tmp_path, hotpot=12)
  workdir = str(tmp_path / "study")
  lines = []
  record = stage1_study.run(
    str(data),
    workdir,
    "restate_lexical",
    steps=2,
    base=base,
    dev_rows=6,
    quick=True,
    log=lines.append,
  )
  pool = _read(os.path.join(real_data.data_dirs(workdir)["stage1"], "train.jsonl"))
  trained = _read(os.path.join(workdir, "study_data_restate", "train.jsonl"))
  _, dev_idx = stage1_study.split_pool([r["docs"][0] for r in pool], 6)
  dev_docs = {pool[i]["docs"][0] for i in dev_idx}
  assert len(dev_docs) == 6 and len(trained) == record["train_rows"]
  assert not dev_docs & {r["docs"][0] for r in trained}
  qa = [r for r in trained if r["data_type"] == "qa"]
  restated = [r for r in trained if r["data_type"] == "paraphrase"]
  assert len(qa) == sum(r["docs"][0] not in dev_docs for r in pool)
  assert sorted(r["answers"][0] for r in restated) == sorted({r["docs"][0] for r in qa})
  assert all(r["answers"] == r["docs"] for r in restated)
  dev = record["dev"]
  assert dev["rows"] == 6 and dev["memory_gain"]["n"] == 6
  assert dev["memory_gain_restate"]["n"] == 6
  assert dev["memory_gain"]["mean"] == pytest.approx(dev["ce_other"] - dev["ce_own"], abs=1e-5)
  assert "lexical" in record["last_train_metrics"]
  assert 0.0 < dev["memory_cosine"] <= 1.0 and 0.0 < dev["variance_off_mean"] < 1.0
  with open(os.path.join(workdir, "stage1", "export", "clara.json")) as f:
    assert json.load(f)["memory_scale"] == "embedding"
  from clara_jax.infer.api import ClaraModel

  assert ClaraModel.load(os.path.join(workdir, "stage1", "export")).memory_scale == "embedding"
  with open(os.path.join(workdir, "study.json")) as f:
    assert json.load(f)["variant"] == "restate_lexical"
  assert any(
    line.startswith("[   study] restate_lexical at 2 steps, 6 dev documents: memory gain")
    for line in lines
  )
  with pytest.raises(ValueError, match="dev_rows must be in"):
    stage1_study.split_pool(["a", "b", "a"], 2)
  with pytest.raises(ValueError, match="unknown variant 'bigger'"):
    stage1_study.run(str(data), workdir, "bigger", steps=2, base=base)
