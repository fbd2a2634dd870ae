"""`clara-jax demo`: the whole CLaRa pipeline on the generated world, on a CPU.

world -> tokenizer + base LM (`lm`) -> compressor pretraining (`stage1`, on fresh
worlds: reading pays, recall cannot; the base replays the world's own text) ->
instruction tuning (`stage1_2`, the same) -> end-to-end (`stage2`, no relevance labels),
with the shuffled-answer ablation and the supervised retriever beside it -> the
hidden-reasoning evaluation of the held-out questions (`clara_jax.eval.hidden`) and
the causal edit, then the claims table (`hidden.claims`):

a. the generator reads its memories (memory gain against a wrong document of the same
   kind and against no memories; EM with the gold memories vs the wrong ones);
b. on held-out persons' one- and two-link chains, stage2 retrieves the document the
   question never names above the kind prior, BM25 in kind, two-hop BM25 and the
   initial reasoner, and the shuffled-answer ablation does not;
c. lens v2: the reasoner's memories rank the gold's name pieces above matched controls,
   above a permutation null and above the initial reasoner;
d. the knowledge probe, reported;
e. the causal edit (`clara_jax.eval.edit`): held-out links edited in the base's text and
   the base fine-tuned on it, adapters kept (`lm_edit`; `lm_sham` fine-tunes on the
   unchanged text): at least half of the edited questions' top-1 moves to the new
   entity's document, above the sham.

A row with a target passes only when its paired-bootstrap interval does; the command
exits 1 when one misses. Every stage resumes from its checkpoint, and a finished stage
is skipped, so running the command again continues where it stopped. Artefacts in the
workdir: `summary.json`, `lens.json`, `lens.png`, `losses.png`, `eval/*.jsonl`, each
stage's `tensorboard/` and `metrics.jsonl`, `edit.json` and `edit/` (the two texts).
`run_seeds` pools several seeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from clara_jax import paths
from configs.recipes.demo import recipe as demo_recipe

PAPER_STAGES = ("lm", "stage1", "stage1_2", "stage2")
STAGES = PAPER_STAGES
# Trained beside stage2 from the same stage1_2 export, for the claims' comparisons: the
# shuffled-answer ablation (stage2 whose answers carry no question-document signal) and
# the supervised retriever (stage2_retrieval, trained on the gold labels: the ceiling).
BASELINE_STAGES = ("stage2_shuffled", "stage2_retrieval")
# The causal edit (`clara_jax.eval.edit`): two short `lm` fine-tunes of the stage2
# export's base, on the world's text with held-out links edited and on it unchanged.
EDIT_STAGES = ("lm_edit", "lm_sham")
EDIT_TEXT = {"lm_edit": "lm_edited.txt", "lm_sham": "lm_unchanged.txt"}  # in workdir/edit
CONFIG_OF = demo_recipe.CONFIG_OF  # workdir name -> configs/ module, where they differ
DONE_FILE = "DONE.json"


class StageStopped(RuntimeError):
  """A stage's training stopped early (preempted): its checkpoint is kept, no export.
  `exit_code`: what the command exits with (128 + the signal that stopped it)."""

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Config overrides: `shared` for every stage, `stages` per stage (dotted keys)."""

  model: str
  shared: Dict[str, Any]
  stages: Dict[str, Dict[str, Any]]
  eval_questions: Optional[int]  # held-out questions evaluated (None: all; else each
  # kind sampled evenly)
  min_memory_gain: float  # claim (a) threshold, nats per answer token
  judged: bool = True  # False (--quick): too few steps for any claim; rows get no verdict


def default_recipe(quick: bool = False) -> Recipe:
  """The recipe, read from configs/recipes/demo/recipe.py (which says why each value);
  docs/results.md records what was measured. `quick`: a few steps per stage, unjudged."""
  shared, stages = demo_recipe.overrides(quick)
  return Recipe(
    model=demo_recipe.MODEL,
    shared=shared,
    stages=stages,
    eval_questions=demo_recipe.QUICK_EVAL_QUESTIONS if quick else demo_recipe.EVAL_QUESTIONS,
    min_memory_gain=demo_recipe.MIN_MEMORY_GAIN,
    judged=not quick,
  )


def stage_config(stage: str, recipe: Recipe, seed: int = 0, extra: Optional[Dict[str, Any]] = None):
  """The stage's config file (`configs/STAGE.py`) with the recipe applied, then
  `extra` (dotted keys known only at run time, e.g. a path in the workdir)."""
  values = {**recipe.shared, **recipe.stages.get(stage, {}), **(extra or {})}
  return demo_recipe.build_config(stage, recipe.model, values, seed)


class ProgressBar:
  """One line per logging step: bar, step, loss, speed and ETA of the running stage."""

  def __init__(self, stage: str, out=sys.stdout, width: int = 24):
    self.stage, self.out, self.width = stage, out, width

  def __call__(self, step: int, total: int, metrics: Dict[str, float]) -> None:
    filled = int(self.width * step / max(total, 1))
    speed = metrics.get("steps_per_s", 0.0)
    eta = (total - step) / speed if speed > 0 else float("nan")
    self.out.write(
      f"[{self.stage:>8}] {'#' * filled}{'.' * (self.width - filled)} "
      f"{step}/{total} loss {metrics.get('loss', float('nan')):.3f} "
      f"{speed:.1f} steps/s ETA {_duration(eta)}\n"
    )
    self.out.flush()


def _duration(seconds: float) -> str:
  if seconds != seconds:  # nan
    return "?"
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_stage(
  stage: str,
  workdir: str,
  recipe: Recipe,
  seed: int = 0,
  log: Callable[[str], None] = print,
  extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
  """Trains one stage unless it finished before; returns its last metrics."""
  from clara_jax.train.loop import train

  stage_dir = paths.join(workdir, stage)
  done = paths.join(stage_dir, DONE_FILE)
  if paths.exists(done):
    log(f"[{stage:>8}] finished before: skipped")
    return paths.read_json(done)["metrics"]
  from clara_jax.train.loop import Preempted

  start = time.perf_counter()
  try:
    metrics = train(
      stage_config(stage, recipe, seed, extra), stage_dir, progress=ProgressBar(stage)
    )
  except Preempted as e:
    raise StageStopped(f"[{stage:>8}] {e}", e.exit_code) from e
  seconds = time.perf_counter() - start
  if not paths.exists(paths.join(stage_dir, "export", "config.json")):
    # train() returns early, checkpoint saved, on SIGTERM: not finished, so not skipped.
    raise StageStopped(
      f"[{stage:>8}] stopped before its last step (SIGTERM?); run the "
      f"same command again to resume from {stage_dir}/checkpoints"
    )
  paths.write_json(done, {"metrics": metrics, "seconds": seconds}, indent=None)
  log(f"[{stage:>8}] done in {_duration(seconds)}")
  return metrics


def world_dir(workdir: str, recipe: Recipe, seed: int = 0) -> str:
  from clara_jax.train.loop import synth_dir

  config = stage_config("stage2", recipe, seed)
  return synth_dir(config, paths.join(workdir, "stage2"))


def held_out_rows(path: str, limit: Optional[int]) -> List[Dict]:
  """Up to `limit` test rows, the same number of each kind where possible (seeded)."""
  import numpy as np

  from clara_jax.eval.evaluate import load_rows

  rows = load_rows(path)
  if limit is None:
    return rows
  by_kind: Dict[str, List[Dict]] = {}
  for row in rows:
    by_kind.setdefault(row.get("kind", "all"), []).append(row)
  rng = np.random.default_rng(0)
  per_kind = max(1, limit // max(len(by_kind), 1))
  picked: List[Dict] = []
  for kind in sorted(by_kind):
    group = by_kind[kind]
    picked.extend(group[i] for i in sorted(rng.permutation(len(group))[:per_kind]))
  return picked


def claims(results: Dict[str, Any], min_gain: float) -> List[Tuple[str, str, str, Optional[bool]]]:
  """(claim, measured, target, passed) rows of the final table (passed None: reported
  without a target)."""
  final, init = results["stage2"], results["stage1_2_init"]
  lens_main, lens_init = results["lens"]["stage2"], results["lens"]["stage1_2_init"]
  multi = final.get("by_kind", {}).get("multi", {})
  rows = [
    (
      "a. memory gain (nats/token)",
      f"{final['memory_gain']:.2f}",
      f">= {min_gain:g}",
      final["memory_gain"] >= min_gain,
    ),
    (
      "a. EM gold memories vs random",
      f"{final['em_oracle']:.2f} vs {final['em_control']:.2f}",
      "gold >> random",
      final["em_oracle"] >= final["em_control"] + 0.2,
    ),
    (
      "b. Recall@1 stage2 vs init",
      f"{final['recall@1']:.2f} vs {init['recall@1']:.2f}",
      "stage2 > init",
      final["recall@1"] > init["recall@1"],
    ),
    (
      "b. Recall@5 stage2 vs init",
      f"{final['recall@5']:.2f} vs {init['recall@5']:.2f}",
      "stage2 > init",
      final["recall@5"] > init["recall@5"],
    ),
  ]
  if multi:
    rows.append(
      (
        "b. multi-hop Recall@1 vs BM25",
        f"{multi['recall@1']:.2f} vs {multi['bm25_recall@1']:.2f}",
        "stage2 > BM25",
        multi["recall@1"] > multi["bm25_recall@1"],
      )
    )
  # The lens passes when the lift's 95% interval over questions lies above zero.
  top = f" (top-{lens_main['top_t']})" if "top_t" in lens_main else ""
  for unit, hit, prefix in (
    ("words", "hit_rate", "lift"),
    ("pieces", "piece_hit_rate", "piece_lift"),
  ):
    if f"hidden_{hit}" not in lens_main:  # older lens files: no piece counts
      continue
    lift, ci = lens_main[prefix], lens_main.get(f"{prefix}_ci95", 0.0)
    rows.append(
      (
        f"c. lens hidden vs control {unit}{top}",
        f"{lens_main[f'hidden_{hit}']:.2f} vs {lens_main[f'control_{hit}']:.2f} "
        f"(lift {lift:+.2f} +- {ci:.2f})",
        "lift > 0 (95%)",
        lift - ci > 0,
      )
    )
  # The rank statistic uses every piece's lens score, not only the top-T (see lens.py);
  # it is reported beside the top-T rows, which keep their own verdicts.
  if "rank_auc" in lens_main:
    auc, ci = lens_main["rank_auc"], lens_main["rank_auc_ci95"]
    init_auc = lens_init.get("rank_auc", float("nan"))
    rows.append(
      (
        "c. lens rank AUC gold vs control pieces",
        f"{auc:.3f} +- {ci:.3f} (init {init_auc:.3f})",
        "> 0.5 (95%)",
        auc - ci > 0.5,
      )
    )
  # The same statistics for the gold documents' own memories: what the reasoner, trained
  # to score near them, can at best inherit (at the demo's size, little; see the log).
  gold_mem = lens_main.get("gold_memories", {})
  if "rank_auc" in gold_mem:
    rows.append(
      (
        "c. reference: gold memories' own lens",
        f"AUC {gold_mem['rank_auc']:.3f} +- {gold_mem['rank_auc_ci95']:.3f}, "
        f"lift {gold_mem['piece_lift']:+.2f} +- {gold_mem['piece_lift_ci95']:.2f}",
        "(reported)",
        None,
      )
    )
  if "clue_piece_recall" in lens_main:
    rows.append(
      (
        "c. clue-piece recall stage2 vs init",
        f"{lens_main['clue_piece_recall']:.2f} vs {lens_init.get('clue_piece_recall', 0.0):.2f}",
        "(reported)",
        None,
      )
    )
  return rows


def claims_met(summary: Dict[str, Any]) -> bool:
  """True when the table has rows and none with a target missed it."""
  return bool(summary["claims"]) and all(
    row.get("passed") is not False for row in summary["claims"]
  )


def format_table(rows: List[Tuple[str, str, str, Optional[bool]]]) -> str:
  width = max(len(r[0]) for r in rows)
  measured_w = max(14, max(len(r[1]) for r in rows))
  lines = [f"{'claim':<{width}}  {'measured':<{measured_w}} {'target':<16} result"]
  for claim, measured, target, passed in rows:
    result = "" if passed is None else ("PASS" if passed else "miss")
    lines.append(f"{claim:<{width}}  {measured:<{measured_w}} {target:<16} {result}")
  return "\n".join(lines)


def plot_losses(workdir: str, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from clara_jax.train.metrics import read_metrics

  fig, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 3))
  for ax, stage in zip(axes, STAGES):
    rows = read_metrics(paths.join(workdir, stage))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_title(stage)
    ax.set_xlabel("step")
  axes[0].set_ylabel("loss")
  fig.tight_layout()
  from clara_jax.eval.lens import save_figure

  save_figure(fig, path)
  plt.close(fig)


def evaluate_pipeline(
  workdir: str, recipe: Recipe, seed: int = 0, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """The hidden-reasoning evaluation (`clara_jax.eval.hidden`) of the held-out questions:
  every reasoner, baseline, lens control and probe the claims compare."""
  from clara_jax.eval import hidden

  world = world_dir(workdir, recipe, seed)
  rows = held_out_rows(paths.join(world, "stage2_test.jsonl"), recipe.eval_questions)
  k = stage_config("stage2", recipe, seed).clara.k
  start = time.perf_counter()
  results = hidden.evaluate_world(workdir, world, rows, k, log, seed)
  log(f"[    eval] {len(rows)} held-out questions in {_duration(time.perf_counter() - start)}")
  return results


def run_edit(
  workdir: str, recipe: Recipe, seed: int = 0, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """The causal edit (`clara_jax.eval.edit`) on the held-out one-link questions: plans
  the edits, writes the edited and the unchanged world text to `workdir/edit/`,
  fine-tunes the stage2 export's base on each (`lm_edit`, `lm_sham`), and measures
  stage2, sham and edit on the same questions. Writes `eval/edit_<model>.jsonl` and
  `edit.json`; returns `edit.summarize`'s summary plus the edits."""
  from clara_jax.data import formats, synth
  from clara_jax.eval import edit, hidden
  from clara_jax.eval.evaluate import load_rows
  from clara_jax.infer.api import ClaraModel

  world = world_dir(workdir, recipe, seed)
  manifest = paths.read_json(paths.join(world, "manifest.json"))
  rows = load_rows(paths.join(world, "stage2_test.jsonl"))
  edits, control = edit.plan_edits(manifest, rows, seed)
  unchanged, edited = edit.edited_lines(manifest, edits)
  with paths.path(paths.join(world, synth.LM_WORLD_FILE)).open() as f:  # UTF-8
    if [line.rstrip("\n") for line in f if line.strip()] != unchanged:
      raise ValueError(
        f"{world}/{synth.LM_WORLD_FILE} differs from the world's rebuilt "
        f"text: the sham would not be the text the base learned"
      )
  for stage, lines in (("lm_edit", edited), ("lm_sham", unchanged)):
    path = paths.join(workdir, "edit", EDIT_TEXT[stage])
    paths.makedirs(paths.parent(path))
    synth.write_text(path, lines)
    run_stage(stage, workdir, recipe, seed, log, extra={"data.source": path})
  per_model, probes = {}, {}
  for name, stage in zip(edit.MODELS, ("stage2",) + tuple(EDIT_STAGES[::-1])):
    export = paths.join(workdir, stage, "export")
    per_model[name] = edit.records(ClaraModel.load(export), rows, manifest, edits, control)
    formats.write_jsonl_atomic(paths.join(workdir, "eval", f"edit_{name}.jsonl"), per_model[name])
    probes[name] = edit.probe(hidden.base_model(export), manifest, edits)
  summary = edit.summarize(per_model, probes)
  summary["edits"] = [dataclasses.asdict(e) for e in edits]
  paths.write_json(paths.join(workdir, "edit.json"), summary)
  log(
    f"[    edit] {len(edits)} links edited, {summary['questions']} questions; "
    f"{summary['control_questions']} control questions"
  )
  return summary


def evaluate_checkpoints(
  workdir: str, rows: List[Dict], k: int, clues=None, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """Evaluation and lens of `rows` (stage2 rows, optional `kind`) with the stage2 export
  and the stage1_2-initialised reasoner: {"stage2", "stage1_2_init", "lens"}, the input
  of `claims`. `clues`: per row, words the lens looks for (None: none known)."""
  from clara_jax.eval.evaluate import evaluate, run_lens
  from clara_jax.infer.api import ClaraModel, initial_reasoner

  final = ClaraModel.load(paths.join(workdir, "stage2", "export"))
  init = initial_reasoner(ClaraModel.load(paths.join(workdir, "stage1_2", "export")))
  start = time.perf_counter()
  results = {
    "stage2": evaluate(
      final, rows, k=k, max_new_tokens=12, out_path=paths.join(workdir, "eval", "stage2.json")
    ),
    "stage1_2_init": evaluate(
      init, rows, k=k, max_new_tokens=12, out_path=paths.join(workdir, "eval", "stage1_2_init.json")
    ),
  }
  results["lens"] = run_lens(
    {"stage2": final, "stage1_2_init": init}, rows, paths.join(workdir, "lens.json"), clues=clues
  )
  log(f"[    eval] {len(rows)} held-out questions in {_duration(time.perf_counter() - start)}")
  return results


def run(
  workdir: str, quick: bool = False, seed: int = 0, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """The demo; returns (and writes) the summary."""
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()  # one progress line per logging step is ours
  workdir = str(paths.path(workdir))
  paths.makedirs(workdir)
  recipe = default_recipe(quick)
  start = time.perf_counter()
  stage_metrics = {
    stage: run_stage(stage, workdir, recipe, seed, log) for stage in STAGES + BASELINE_STAGES
  }
  results = evaluate_pipeline(workdir, recipe, seed, log)
  results["edit"] = run_edit(workdir, recipe, seed, log)
  return write_report(workdir, recipe, stage_metrics, results, time.perf_counter() - start, log)


def run_seeds(
  workdir: str, seeds: List[int], quick: bool = False, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """The demo at each seed (in `workdir/seed<N>`), then the claims over every seed's
  questions pooled (`hidden.pool_seeds`) beside each seed's verdict; writes
  `workdir/seeds_summary.json`. The table of a protocol's fresh seeds."""
  from clara_jax.eval import hidden

  recipe = default_recipe(quick)
  dirs = {seed: paths.join(workdir, f"seed{seed}") for seed in seeds}
  per_seed = {seed: run(dirs[seed], quick, seed, log) for seed in seeds}
  k = stage_config("stage2", recipe, seeds[0]).clara.k
  pooled = hidden.claims(hidden.pool_seeds(dirs, k), recipe.min_memory_gain)
  if not recipe.judged:
    pooled = [(c, m, f"{t} (not judged)", None) for c, m, t, _ in pooled]
  verdicts = {seed: {c["claim"]: c["passed"] for c in s["claims"]} for seed, s in per_seed.items()}
  table = format_seeds_table(pooled, verdicts)
  summary = {
    "seeds": seeds,
    "recipe": dataclasses.asdict(recipe),
    "claims": [dict(zip(("claim", "measured", "target", "passed"), row)) for row in pooled],
    "per_seed": {str(seed): s["claims"] for seed, s in per_seed.items()},
    "provenance": provenance(),
  }
  paths.write_text(
    paths.join(workdir, "seeds_summary.json"), json.dumps(summary, indent=1, default=str)
  )
  log("\n" + table)
  return summary


def format_seeds_table(
  pooled: List[Tuple[str, str, str, Optional[bool]]], verdicts: Dict[int, Dict[str, Optional[bool]]]
) -> str:
  """The pooled table with one verdict column per seed (PASS / miss / - for no target)."""
  mark = lambda passed: "-" if passed is None else ("PASS" if passed else "miss")
  seeds = sorted(verdicts)
  rows = [
    (claim, measured, target, passed, " ".join(f"{mark(verdicts[s].get(claim)):<4}" for s in seeds))
    for claim, measured, target, passed in pooled
  ]
  width = max(len(r[0]) for r in rows)
  measured_w = max(len(r[1]) for r in rows)
  target_w = max(16, max(len(r[2]) for r in rows))
  head = " ".join(f"s{s:<3}" for s in seeds)
  lines = [
    f"{'claim (all seeds pooled)':<{width}}  {'measured':<{measured_w}} "
    f"{'target':<{target_w}} {'pooled':<6} {head}"
  ]
  for claim, measured, target, passed, per_seed in rows:
    lines.append(
      f"{claim:<{width}}  {measured:<{measured_w}} {target:<{target_w}} "
      f"{mark(passed):<6} {per_seed}"
    )
  return "\n".join(lines)


def provenance() -> Dict[str, Any]:
  """What produced a report: the time, the command line, and the git commit of the
  clara_jax checkout (with whether it had uncommitted changes), where there is one."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out: Dict[str, Any] = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": list(sys.argv)}
  try:
    git = lambda *a: subprocess.run(
      ["git", "-C", root, *a], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    out["commit"] = git("rev-parse", "HEAD")
    out["uncommitted_changes"] = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    out["commit"] = None  # an installed package, not a checkout
  return out


def write_report(
  workdir: str,
  recipe: Recipe,
  stage_metrics: Dict[str, Dict],
  results: Dict[str, Any],
  seconds: float,
  log: Callable[[str], None] = print,
  extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
  """Claims table, `losses.png` and `summary.json` (recipe, stage metrics, results,
  claims, seconds, plus `extra`); logs the table; returns the summary."""
  if "comparisons" in results:  # the generated world's hidden-reasoning evaluation
    from clara_jax.eval import hidden

    table = hidden.claims(results, recipe.min_memory_gain)
  elif "lens_matched" in results:  # real questions on a pretrained base
    from clara_jax.eval import real

    table = real.claims(results, recipe.min_memory_gain)
  else:
    table = claims(results, recipe.min_memory_gain)
  if not recipe.judged:
    table = [
      (claim, measured, f"{target} (not judged)", None) for claim, measured, target, _ in table
    ]
  plot_losses(workdir, paths.join(workdir, "losses.png"))
  summary = {
    "recipe": dataclasses.asdict(recipe),
    "stages": stage_metrics,
    "results": results,
    "claims": [dict(zip(("claim", "measured", "target", "passed"), row)) for row in table],
    "seconds": seconds,
    "provenance": provenance(),
    **(extra or {}),
  }
  paths.write_text(paths.join(workdir, "summary.json"), json.dumps(summary, indent=1, default=str))
  log("\n" + format_table(table))
  log(f"\nartefacts in {workdir}: summary.json, lens.png, losses.png, */tensorboard")
  return summary
