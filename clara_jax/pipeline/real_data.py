"""The real-data recipes' steps (`DATA = "real"`): the QA files converted, split and
written for each stage, the generator prompts fitted, a pretrained base imported, the
memory cache.

The inputs are the files described in DATA_DIR/SOURCES.md (read in place; nothing is
copied into the repository):

* `hotpotqa_dev500.jsonl` (IRCoT HotpotQA, multi-hop): stage2 rows of 20 candidates (its
  10 paragraphs + 10 BM25 distractors from the other questions' paragraphs) and stage1_2
  rows of k documents, with the project's converter (`clara_jax.data.convert`, seeded);
* `nq_open_oracle.jsonl.gz` (NQ-open, single-hop): the same, its gold passage + 19 BM25
  distractors from the other questions' gold passages;
* `clara_pretrain_1k.jsonl`: stage1 rows (converter passthrough), their QA pairs
  regrouped (one per row by default) so every pair fits the answer region.

Each QA set is split into train and held-out questions (seeded, by question); no
held-out question appears in any stage's training file. Two bases:

* from scratch (default): every distinct passage (all questions', held-out included:
  they are the corpus, not the answers) becomes one line of plain text, on which the
  tokenizer and the `tiny` base LM (`lm`) are trained; then stage1 (pretraining rows),
  stage1_2 and stage2 (HotpotQA + NQ training questions), each from the previous
  stage's export, evaluated against the initial reasoner with the lens
  (configs/recipes/real_tiny, `clara_jax.pipeline.evaluation`);
* pretrained (`--base smollm2` or a GGUF file): the base and its tokenizer are imported
  as the `lm` stage's export and stay frozen (configs/recipes/real_pretrained); stage1 also reads the
  NQ training questions' gold passages; the stage1_2 compressor's memories of every
  stage2 candidate are cached once (`memories/`) for stage2 and the evaluation
  (`clara_jax.eval.real`: memory gain, EM/F1 closed book vs with memories, Recall@1/5
  against the initial reasoner, BM25 and random with paired intervals, the lens against
  a permutation null, `examples.md`).

`kind` multi = HotpotQA, single = NQ. The claims table is printed and written to
`summary.json`; the command exits 1 when a claim with a target misses.

Workdir layout (besides the demo's stage directories, `eval/`, `lens.*`, `losses.png`):

    data/converted/{hotpotqa,nq}_{stage2,stage1_2}.jsonl, pretrain_stage1.jsonl
    data/lm/train.txt            one passage per line (tokenizer + `lm`)
    data/{stage1,stage1_2,stage2}/train.jsonl
    data/heldout.jsonl           held-out stage2 rows with `kind`
    data/DONE.json               the data plan and the conversion reports
    memories/                    the cached memories (pretrained base)

Re-running resumes: the data is kept when its plan is unchanged, and finished stages are
skipped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from clara_jax import paths
from clara_jax.data import formats
from clara_jax.pipeline import recipe as recipe_lib
from clara_jax.pipeline.recipe import Recipe
from clara_jax.pipeline.stages import DONE_FILE, duration, finished_metrics, mark_finished

if TYPE_CHECKING:
  from clara_jax.data.tokenizer import ClaraTokenizer

HOTPOTQA_FILE = "hotpotqa_dev500.jsonl"
NQ_FILE = "nq_open_oracle.jsonl.gz"
PRETRAIN_FILE = "clara_pretrain_1k.jsonl"
# QA set -> (converter format, file, `kind` of its held-out rows)
QA_SETS = {"hotpotqa": ("hotpotqa_ircot", HOTPOTQA_FILE, "multi"), "nq": ("nq", NQ_FILE, "single")}


# Pretrained bases `--base` names: fetched once (`clara_jax.weights.fetch`) -> the
# model size of their shapes. Any other `--base` value is a path to a GGUF file.
BASES = {"smollm2": "smollm2_135m"}


@dataclasses.dataclass(frozen=True)
class DataPlan:
  """What is converted and held out.

  limits: per source (hotpotqa, nq, pretrain), convert only the first N rows (None: all;
  the distractor pool is then those rows' passages); test: held-out questions per QA
  set; candidates, k: documents per stage2 / stage1_2 row; qa_per_row: QA pairs per
  stage1 row (a pair is ~50 tokens under the 4096-piece tokenizer, the answer region
  64); nq_stage1: stage1 also reads the NQ training questions' gold passages with their
  question and answer; restate_stage1: stage1 also reads one restatement row per
  document of its pool (`restatement_rows`); seed: converter shuffle and train/test
  split seed.
  """

  limits: Dict[str, Optional[int]]
  test: Dict[str, int]
  candidates: int = 20
  k: int = 3
  qa_per_row: int = 1
  nq_stage1: bool = False
  restate_stage1: bool = False
  seed: int = 0


def data_plan(recipe: Recipe, seed: int = 0) -> DataPlan:
  """The data plan a real-data recipe declares (`DATA_PLAN`, or `QUICK_DATA_PLAN` in its
  quick variant), seeded."""
  if recipe.data_plan is None:
    raise ValueError(f"recipe {recipe.name!r} has no data plan (DATA = {recipe.data!r})")
  return DataPlan(**recipe.data_plan, seed=seed)


def with_run_values(
  recipe: Recipe, plan: DataPlan, dirs: Dict[str, str], base: Optional[str] = None
) -> Recipe:
  """The recipe with what only the run knows: `plan.k` documents per stage1_2 prompt,
  `plan.candidates` per stage2 row, each stage's data directory of `prepare_data`
  (`dirs`), and for a recipe that imports its base, the model size of its shapes (a
  `BASES` name's; "tiny" for a GGUF file: the imported export's own config is what
  trains) and, with `memory_cache`, the cache stage2 reads. The generator prompt
  lengths are set once the base exists (`fit_recipe`)."""
  stages = {stage: {"data.source": dirs[stage]} for stage in recipe.stages}
  fields: Dict[str, Any] = {}
  if recipe.memory_cache:
    stages["stage2"]["data.memory_cache"] = memory_cache_dir(paths.parent(dirs["root"]))
  if recipe.base == "import":
    fields["model"] = BASES.get(base or "", "tiny")
  shared = {"clara.k": plan.k, "data.candidates": plan.candidates}
  return recipe_lib.with_overrides(recipe, shared, stages, **fields)


def memory_cache_dir(workdir: str) -> str:
  return paths.join(workdir, "memories")


# ---------------------------------------------------------------------------------------
# Data: conversion, split, text.


def source_path(data_dir: str, name: str) -> str:
  path = paths.join(data_dir, name)
  if not paths.exists(path):
    raise FileNotFoundError(
      f"{path}: missing; --data_dir must hold the files listed in "
      f"its SOURCES.md ({HOTPOTQA_FILE}, {NQ_FILE}, {PRETRAIN_FILE})"
    )
  return path


def read_jsonl(path: str) -> List[Dict]:
  with paths.path(path).open() as f:  # UTF-8
    return [json.loads(line) for line in f if line.strip()]


def split_ids(rows: Sequence[Dict], num_test: int, seed: int) -> set:
  """The ids of `num_test` rows drawn at random (seeded): the held-out questions."""
  import numpy as np

  if not 0 < num_test < len(rows):
    raise ValueError(f"cannot hold out {num_test} of {len(rows)} questions: need 0 < test < rows")
  ids = [r["id"] for r in rows]
  if len(set(ids)) != len(ids):
    raise ValueError("converted rows have duplicate ids: the split would leak questions")
  order = np.random.default_rng(seed).permutation(len(ids))
  return {ids[i] for i in order[:num_test]}


def regroup_qa(rows: Sequence[Dict], per_row: int) -> List[Dict]:
  """stage1 QA rows with at most `per_row` question/answer pairs each (same document):
  all of a row's pairs are then trained on, instead of the first few that fit the
  answer region. Paraphrase rows pass through."""
  out = []
  for row in rows:
    if row.get("data_type", "qa") != "qa":
      out.append(row)
      continue
    pairs = list(zip(row["question"], row["answers"]))
    for start in range(0, len(pairs), per_row):
      chunk = pairs[start : start + per_row]
      out.append(
        {
          "data_type": "qa",
          "question": [q for q, _ in chunk],
          "answers": [a for _, a in chunk],
          "docs": row["docs"],
        }
      )
  return out


def gold_passage_rows(rows: Sequence[Dict]) -> List[Dict]:
  """stage1 QA rows of stage2 rows' first gold passage with their question and answer
  (rows without a gold passage are left out)."""
  return [
    {
      "data_type": "qa",
      "question": [r["question"]],
      "answers": [r["answers"][0]],
      "docs": [r["docs"][r["pos_index"][0]]],
    }
    for r in rows
    if r["pos_index"]
  ]


def restatement_rows(rows: Sequence[Dict]) -> List[Dict]:
  """stage1 paraphrase rows whose target is the document itself, one per distinct
  document of `rows` (first-seen order): the pool has no generated paraphrases, and a
  restatement asks the memories for the whole document, not the few facts its QA pairs
  name. The generator reads the answer region's first tokens of it."""
  docs = dict.fromkeys(row["docs"][0] for row in rows)
  return [
    {"data_type": "paraphrase", "question": [], "answers": [doc], "docs": [doc]} for doc in docs
  ]


def passages(row_lists: Sequence[Sequence[Dict]]) -> List[str]:
  """Distinct documents of all rows in first-seen order, each on one line (newlines,
  e.g. the converter's "title\\nparagraph", become spaces)."""
  seen: Dict[str, None] = {}  # an ordered set
  for rows in row_lists:
    for row in rows:
      for doc in row["docs"]:
        line = " ".join(doc.split())
        if line:
          seen.setdefault(line, None)
  return list(seen)


def _write_lines(path: str, lines: Sequence[str]) -> None:
  paths.write_atomic(path, (line + "\n" for line in lines))


def data_dirs(workdir: str) -> Dict[str, str]:
  """Where `prepare_data` writes: the `lm` text file, each stage's directory of
  `train.jsonl`, the held-out file, the converted files."""
  root = paths.join(workdir, "data")
  return {
    "root": root,
    "converted": paths.join(root, "converted"),
    "lm": paths.join(root, "lm", "train.txt"),
    "stage1": paths.join(root, "stage1"),
    "stage1_2": paths.join(root, "stage1_2"),
    "stage2": paths.join(root, "stage2"),
    "heldout": paths.join(root, "heldout.jsonl"),
  }


def convert_sources(
  data_dir: str, out_dir: str, plan: DataPlan, log: Callable[[str], None] = print
) -> Dict[str, Dict]:
  """Runs the converter on every source: {name: report dict}; files in `out_dir` as
  `{hotpotqa,nq}_{stage2,stage1_2}.jsonl` and `pretrain_stage1.jsonl`."""
  from clara_jax.data.convert import convert

  reports = {}
  for name, (fmt, filename, _) in QA_SETS.items():
    for stage in ("stage2", "stage1_2"):
      report = convert(
        fmt,
        source_path(data_dir, filename),
        paths.join(out_dir, f"{name}_{stage}.jsonl"),
        candidates=plan.candidates,
        k=plan.k,
        seed=plan.seed,
        stage=stage,
        limit=plan.limits.get(name),
      )
      reports[f"{name}_{stage}"] = report.to_dict()
      log(f"[    data] {report.summary()}")
  report = convert(
    "stage1",
    source_path(data_dir, PRETRAIN_FILE),
    paths.join(out_dir, "pretrain_stage1.jsonl"),
    limit=plan.limits.get("pretrain"),
  )
  reports["pretrain_stage1"] = report.to_dict()
  log(f"[    data] {report.summary()}")
  return reports


def split_qa_sets(
  converted: str, plan: DataPlan
) -> Tuple[Dict[str, List[Dict]], List[Dict], Dict[str, Dict]]:
  """({"stage2": train rows, "stage1_2": train rows}, held-out stage2 rows with `kind`,
  {set: counts}) of the converted QA sets; a question is in train or held out for both
  stages."""
  train: Dict[str, List[Dict]] = {"stage2": [], "stage1_2": []}
  heldout: List[Dict] = []
  counts: Dict[str, Dict] = {}
  for name, (_, _, kind) in QA_SETS.items():
    stage2 = read_jsonl(paths.join(converted, f"{name}_stage2.jsonl"))
    stage1_2 = read_jsonl(paths.join(converted, f"{name}_stage1_2.jsonl"))
    test_ids = split_ids(stage2, plan.test[name], plan.seed)
    train["stage2"] += [r for r in stage2 if r["id"] not in test_ids]
    train["stage1_2"] += [r for r in stage1_2 if r["id"] not in test_ids]
    heldout += [dict(r, kind=kind) for r in stage2 if r["id"] in test_ids]
    counts[name] = {"train": len(stage2) - len(test_ids), "test": len(test_ids)}
  return train, heldout, counts


def prepare_data(
  data_dir: str, workdir: str, plan: DataPlan, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """Converts, splits and writes every stage's data (see the module docstring); kept
  when `data/DONE.json` records the same plan. Returns that record: {"plan", "reports",
  "counts", "seconds"}."""
  dirs = data_dirs(workdir)
  done = paths.join(dirs["root"], DONE_FILE)
  plan_dict = json.loads(json.dumps(dataclasses.asdict(plan)))
  if paths.exists(done):
    record = paths.read_json(done)
    if record["plan"] == plan_dict:
      log("[    data] prepared before: kept")
      return record
    raise ValueError(
      f"{done}: the data there was prepared with another plan "
      f"({record['plan']}, now {plan_dict}); use another --workdir"
    )
  start = time.perf_counter()
  reports = convert_sources(data_dir, dirs["converted"], plan, log)
  train, heldout, set_counts = split_qa_sets(dirs["converted"], plan)
  # {set: {"train", "test"}}, then the written rows' counts too (the same dict).
  counts: Dict[str, Any] = set_counts
  pretrain = read_jsonl(paths.join(dirs["converted"], "pretrain_stage1.jsonl"))
  stage1 = regroup_qa(pretrain, plan.qa_per_row)
  if plan.nq_stage1:
    nq_ids = {r["id"] for r in read_jsonl(paths.join(dirs["converted"], "nq_stage2.jsonl"))}
    nq_train = [r for r in train["stage2"] if r["id"] in nq_ids]
    stage1 += gold_passage_rows(nq_train)
  if plan.restate_stage1:
    stage1 += restatement_rows(stage1)
  qa_all = [read_jsonl(paths.join(dirs["converted"], f"{name}_stage2.jsonl")) for name in QA_SETS]
  text = passages([pretrain, *qa_all])
  _write_lines(dirs["lm"], text)
  formats.write_jsonl_atomic(paths.join(dirs["stage1"], "train.jsonl"), stage1)
  for stage in ("stage1_2", "stage2"):
    formats.write_jsonl_atomic(paths.join(dirs[stage], "train.jsonl"), train[stage])
  formats.write_jsonl_atomic(dirs["heldout"], heldout)
  counts.update(
    passages=len(text),
    stage1=len(stage1),
    stage1_2=len(train["stage1_2"]),
    stage2=len(train["stage2"]),
    heldout=len(heldout),
  )
  record = {
    "plan": plan_dict,
    "reports": reports,
    "counts": counts,
    "seconds": time.perf_counter() - start,
  }
  paths.write_json(done, record, indent=1)
  log(
    f"[    data] {counts['passages']} passages, stage1 {len(stage1)}, stage1_2 "
    f"{len(train['stage1_2'])}, stage2 {len(train['stage2'])} train rows, "
    f"{len(heldout)} held out"
  )
  return record


# ---------------------------------------------------------------------------------------
# The pipeline.


def prompt_tokens(tok: ClaraTokenizer, user: str, system: str) -> int:
  """Length of a generator prompt as the featurizer encodes it (bos included)."""
  return len(tok.encode_prompt(user, system))


def fitted_prompt_lengths(
  tok: ClaraTokenizer, questions: Sequence[str], n_mem: int, k: int, style: str, multiple: int = 8
) -> Dict[str, int]:
  """Generator prompt lengths, rounded up to `multiple`, that fit every row:
  {"stage1": the memory-slot prompt of stage1, "answer": the longest question's prompt
  with k slots (stage1_2, stage2)}. Real questions are long and the packer never cuts a
  memory slot, so the length comes from the data once the tokenizer exists."""
  from clara_jax.data import templates

  round_up = lambda n: -(-n // multiple) * multiple
  row = {"data_type": "qa", "question": ["?"], "answers": ["."], "docs": ["."]}
  system, user, _ = templates.stage1_turn(row, n_mem, None, style)
  longest = max(
    prompt_tokens(tok, *reversed(templates.answer_turn(q, n_mem, k, style))) for q in questions
  )
  return {"stage1": round_up(prompt_tokens(tok, user, system)), "answer": round_up(longest)}


def fit_recipe(
  recipe: Recipe, workdir: str, dirs: Dict[str, str], log: Callable[[str], None] = print
) -> Recipe:
  """The recipe with `data.prompt_length` fitted to the training questions under the
  `lm` stage's tokenizer (see `fitted_prompt_lengths`)."""
  from clara_jax.data.tokenizer import load_tokenizer

  config = recipe_lib.stage_config("stage2", recipe)
  tok = load_tokenizer(paths.join(workdir, "lm", "export"), config.tokenizer.num_mem_tokens)
  questions = [
    r["question"]
    for stage in ("stage1_2", "stage2")
    for r in read_jsonl(paths.join(dirs[stage], "train.jsonl"))
  ]
  n_mem = config.clara.doc_max_length // config.clara.compr_rate
  # One prompt length serves stage1_2 and stage2, so it fits the larger of their k.
  k = max(recipe_lib.stage_config(stage, recipe).clara.k for stage in ("stage1_2", "stage2"))
  lengths = fitted_prompt_lengths(tok, questions, n_mem, k, config.data.prompt_style)
  log(
    f"[    data] generator prompts: {lengths['stage1']} tokens (stage1), "
    f"{lengths['answer']} (longest question, stage1_2 and stage2)"
  )
  return recipe_lib.with_overrides(
    recipe,
    {"data.prompt_length": lengths["answer"]},
    {"stage1": {"data.prompt_length": lengths["stage1"]}},
  )


def import_base(
  base: str, workdir: str, num_mem_tokens: int, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """The pretrained base as the `lm` stage's export (what stage1 starts from): `base` is
  a `BASES` name (fetched once) or a GGUF file, imported with its own tokenizer plus
  CLaRa's tokens and `num_mem_tokens` memory tokens. Skipped when done before; returns
  the stage's record metrics."""
  stage_dir = paths.join(workdir, "lm")
  done = finished_metrics(stage_dir)
  if done is not None:
    log("[      lm] imported before: skipped")
    return done
  from clara_jax.data.tokenizer import BPETokenizer
  from clara_jax.weights.export import save_params
  from clara_jax.weights.gguf_import import import_gguf

  start = time.perf_counter()
  if base in BASES:
    from clara_jax.weights.fetch import fetch_base

    path = fetch_base(base)
  elif paths.isfile(base):
    path = base
  else:
    raise FileNotFoundError(
      f"--base {base!r}: neither a known base ({sorted(BASES)}) nor a GGUF file"
    )
  with paths.local_file(path) as local:  # the GGUF reader maps a local file
    tok = BPETokenizer.from_gguf(local, num_mem_tokens)
    cfg, params = import_gguf(local, tok.num_special)
  export = paths.join(stage_dir, "export")
  save_params(export, cfg, params)
  tok.save(paths.join(export, tok.FILENAME))
  metrics = {"imported": str(paths.path(path)), "num_params": cfg.num_params()}
  mark_finished(stage_dir, metrics, time.perf_counter() - start)
  log(
    f"[      lm] {paths.path(path).name} imported: {cfg.num_params() / 1e6:.0f}M "
    f"parameters, {cfg.num_layers} layers, chat format {tok.chat_format}"
  )
  return metrics


def build_memory_cache(
  workdir: str, dirs: Dict[str, str], log: Callable[[str], None] = print
) -> str:
  """The stage1_2 compressor's memories of every stage2 candidate, training and
  held-out (`clara_jax.train.memory_cache`), in `workdir/memories`; resumes an
  interrupted build, skips a finished one. Returns the directory."""
  from clara_jax.infer.api import ClaraModel
  from clara_jax.train import memory_cache

  out = memory_cache_dir(workdir)
  if paths.exists(paths.join(out, memory_cache.CACHE_FILE)):
    log("[  memory] cached before: kept")
    return out
  model = ClaraModel.load(paths.join(workdir, "stage1_2", "export"))
  texts = [
    d
    for path in (paths.join(dirs["stage2"], "train.jsonl"), dirs["heldout"])
    for row in read_jsonl(path)
    for d in row["docs"]
  ]
  start = time.perf_counter()
  record = memory_cache.build_cache(
    model, texts, out, progress=lambda done, total: log(f"[  memory] shard {done}/{total}")
  )
  log(
    f"[  memory] {record['num_docs']} documents compressed in "
    f"{duration(time.perf_counter() - start)}"
  )
  return out
