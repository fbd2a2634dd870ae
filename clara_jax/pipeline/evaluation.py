"""The evaluations a recipe names (`EVALUATION`), each a function that evaluates a
finished pipeline and one that turns its results into claim rows:

* "hidden_world": the generated world's hidden-reasoning evaluation and causal edit
  (`clara_jax.pipeline.world`), judged by `clara_jax.eval.hidden.claims`;
* "checkpoints": evaluation and lens of the stage2 export against its initial reasoner
  (the stage1_2 export's) on the held-out rows, judged by `checkpoint_claims`;
* "real": real questions on a pretrained base (`clara_jax.eval.real`).

A claim row is (claim, measured, target, passed); passed None: reported without a
target.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from clara_jax import paths
from clara_jax.eval.stats import ClaimRow, reported
from clara_jax.pipeline.recipe import Recipe, stage_config
from clara_jax.pipeline.stages import duration


@dataclasses.dataclass(frozen=True)
class Finished:
  """A pipeline whose stages are trained: what an evaluation reads."""

  workdir: str
  recipe: Recipe
  seed: int
  heldout: Optional[str]  # the held-out rows' file (None: the world's test file)
  log: Callable[[str], None] = print


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


def evaluate_checkpoints(
  workdir: str,
  rows: List[Dict],
  k: int,
  clues: Optional[List[Any]] = None,
  log: Callable[[str], None] = print,
) -> Dict[str, Any]:
  """Evaluation and lens of `rows` (stage2 rows, optional `kind`) with the stage2 export
  and the stage1_2-initialised reasoner: {"stage2", "stage1_2_init", "lens"}, the input
  of `checkpoint_claims`. `clues`: per row, words the lens looks for (None: none
  known)."""
  from clara_jax.eval.evaluate import evaluate, run_lens
  from clara_jax.infer.api import ClaraModel, initial_reasoner

  final = ClaraModel.load(paths.join(workdir, "stage2", "export"))
  init = initial_reasoner(ClaraModel.load(paths.join(workdir, "stage1_2", "export")))
  models = {"stage2": final, "stage1_2_init": init}
  start = time.perf_counter()
  results: Dict[str, Any] = {
    name: evaluate(
      model, rows, k=k, max_new_tokens=12, out_path=paths.join(workdir, "eval", f"{name}.json")
    )
    for name, model in models.items()
  }
  results["lens"] = run_lens(models, rows, paths.join(workdir, "lens.json"), clues=clues)
  log(f"[    eval] {len(rows)} held-out questions in {duration(time.perf_counter() - start)}")
  return results


def _answer_rows(results: Dict[str, Any], min_gain: float) -> List[ClaimRow]:
  """(a) the generator reads its memories; (b) stage2 retrieves better than its start."""
  final, init = results["stage2"], results["stage1_2_init"]
  rows: List[ClaimRow] = [
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
  ]
  for at in (1, 5):
    key = f"recall@{at}"
    rows.append(
      (
        f"b. Recall@{at} stage2 vs init",
        f"{final[key]:.2f} vs {init[key]:.2f}",
        "stage2 > init",
        final[key] > init[key],
      )
    )
  multi = final.get("by_kind", {}).get("multi", {})
  if multi:
    rows.append(
      (
        "b. multi-hop Recall@1 vs BM25",
        f"{multi['recall@1']:.2f} vs {multi['bm25_recall@1']:.2f}",
        "stage2 > BM25",
        multi["recall@1"] > multi["bm25_recall@1"],
      )
    )
  return rows


def _lens_hit_rows(lens: Dict[str, Any]) -> List[ClaimRow]:
  """(c) the lens's top-T hits, words and pieces: a row passes when the lift's 95%
  interval over questions lies above zero."""
  top = f" (top-{lens['top_t']})" if "top_t" in lens else ""
  rows: List[ClaimRow] = []
  for unit, hit, prefix in (
    ("words", "hit_rate", "lift"),
    ("pieces", "piece_hit_rate", "piece_lift"),
  ):
    if f"hidden_{hit}" not in lens:  # older lens files: no piece counts
      continue
    lift, ci = lens[prefix], lens.get(f"{prefix}_ci95", 0.0)
    rows.append(
      (
        f"c. lens hidden vs control {unit}{top}",
        f"{lens[f'hidden_{hit}']:.2f} vs {lens[f'control_{hit}']:.2f} "
        f"(lift {lift:+.2f} +- {ci:.2f})",
        "lift > 0 (95%)",
        lift - ci > 0,
      )
    )
  return rows


def _lens_rank_rows(lens: Dict[str, Any], lens_init: Dict[str, Any]) -> List[ClaimRow]:
  """(c) the rank statistic over every piece's lens score (not only the top-T), the gold
  documents' own memories as a reference (what the reasoner, trained to score near
  them, can at best inherit), and the clue pieces recalled; the last two reported."""
  rows: List[ClaimRow] = []
  if "rank_auc" in lens:
    auc, ci = lens["rank_auc"], lens["rank_auc_ci95"]
    init_auc = lens_init.get("rank_auc", float("nan"))
    rows.append(
      (
        "c. lens rank AUC gold vs control pieces",
        f"{auc:.3f} +- {ci:.3f} (init {init_auc:.3f})",
        "> 0.5 (95%)",
        auc - ci > 0.5,
      )
    )
  gold_mem = lens.get("gold_memories", {})
  if "rank_auc" in gold_mem:
    rows.append(
      reported(
        "c. reference: gold memories' own lens",
        f"AUC {gold_mem['rank_auc']:.3f} +- {gold_mem['rank_auc_ci95']:.3f}, "
        f"lift {gold_mem['piece_lift']:+.2f} +- {gold_mem['piece_lift_ci95']:.2f}",
      )
    )
  if "clue_piece_recall" in lens:
    rows.append(
      reported(
        "c. clue-piece recall stage2 vs init",
        f"{lens['clue_piece_recall']:.2f} vs {lens_init.get('clue_piece_recall', 0.0):.2f}",
      )
    )
  return rows


def checkpoint_claims(results: Dict[str, Any], min_gain: float) -> List[ClaimRow]:
  """The claim rows of `evaluate_checkpoints`' results."""
  lens, lens_init = results["lens"]["stage2"], results["lens"]["stage1_2_init"]
  return _answer_rows(results, min_gain) + _lens_hit_rows(lens) + _lens_rank_rows(lens, lens_init)


def _held_out(run: Finished) -> Tuple[List[Dict], int]:
  assert run.heldout is not None
  rows = held_out_rows(run.heldout, run.recipe.eval_questions)
  return rows, stage_config("stage2", run.recipe, run.seed).clara.k


def _hidden_world(run: Finished) -> Dict[str, Any]:
  from clara_jax.pipeline import world

  results = world.evaluate_world(run.workdir, run.recipe, run.seed, run.log)
  results["edit"] = world.run_edit(run.workdir, run.recipe, run.seed, run.log)
  return results


def _checkpoints(run: Finished) -> Dict[str, Any]:
  rows, k = _held_out(run)
  # clues=None: the lens's hidden words are the gold document's words absent from the
  # question (and from the control candidate): no clue manifest exists for real data.
  return evaluate_checkpoints(run.workdir, rows, k, clues=None, log=run.log)


def _real(run: Finished) -> Dict[str, Any]:
  from clara_jax.eval import real
  from clara_jax.pipeline.real_data import memory_cache_dir

  rows, k = _held_out(run)
  return real.evaluate_run(run.workdir, rows, k, memory_cache_dir(run.workdir), run.seed, run.log)


def _hidden_claims(results: Dict[str, Any], min_gain: float) -> List[ClaimRow]:
  from clara_jax.eval import hidden

  return hidden.claims(results, min_gain)


def _real_claims(results: Dict[str, Any], min_gain: float) -> List[ClaimRow]:
  from clara_jax.eval import real

  return real.claims(results, min_gain)


# EVALUATION name -> (evaluate a finished pipeline, its results' claim rows).
EVALUATIONS: Dict[
  str, Tuple[Callable[[Finished], Dict[str, Any]], Callable[..., List[ClaimRow]]]
] = {
  "hidden_world": (_hidden_world, _hidden_claims),
  "checkpoints": (_checkpoints, checkpoint_claims),
  "real": (_real, _real_claims),
}


def evaluate(run: Finished) -> Dict[str, Any]:
  return EVALUATIONS[run.recipe.evaluation][0](run)


def claims(recipe: Recipe, results: Dict[str, Any]) -> List[ClaimRow]:
  """The claim rows of `results`; in an unjudged (quick) recipe, without verdicts."""
  rows = EVALUATIONS[recipe.evaluation][1](results, recipe.min_memory_gain)
  return rows if recipe.judged else unjudged(rows)


def unjudged(rows: List[ClaimRow]) -> List[ClaimRow]:
  return [(claim, measured, f"{target} (not judged)", None) for claim, measured, target, _ in rows]
