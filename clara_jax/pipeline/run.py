"""The pipeline runner: a recipe's inputs prepared, its stages trained in order (each
resumable, a finished one skipped), its evaluation, the report.

    summary = run("demo", "/tmp/demo", quick=True)
    summary = run("real_pretrained", "/tmp/real", data_dir=DATA, base="smollm2")

Running the same command again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Union

from clara_jax import paths
from clara_jax.pipeline import evaluation, real_data, report
from clara_jax.pipeline import recipe as recipe_lib
from clara_jax.pipeline.recipe import Recipe
from clara_jax.pipeline.stages import run_stage


@dataclasses.dataclass
class Prepared:
  """A pipeline ready to train: the recipe with its run-time values, the held-out rows'
  file (None: the world's), the stages' metrics so far, what the summary records of
  the inputs."""

  recipe: Recipe
  heldout: Optional[str] = None
  stage_metrics: Dict[str, Dict] = dataclasses.field(default_factory=dict)
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


def check_inputs(recipe: Recipe, data_dir: Optional[str], base: Optional[str]) -> None:
  """A ValueError naming the flag a recipe needs and lacks, or has and cannot use."""
  if recipe.data == "real" and not data_dir:
    raise ValueError(f"recipe {recipe.name!r} reads the real QA files: give --data_dir")
  if recipe.data == "world" and data_dir:
    raise ValueError(f"recipe {recipe.name!r} generates its world: --data_dir is not used")
  if recipe.base == "import" and not base:
    raise ValueError(f"recipe {recipe.name!r} starts from a pretrained model: give --base")
  if recipe.base == "lm" and base:
    raise ValueError(f"recipe {recipe.name!r} trains its base (`lm`): --base is not used")


def prepare(
  recipe: Recipe,
  workdir: str,
  seed: int = 0,
  data_dir: Optional[str] = None,
  base: Optional[str] = None,
  log: Callable[[str], None] = print,
  plan: Optional[real_data.DataPlan] = None,
) -> Prepared:
  """The inputs before the first trained stage: for real data the converted files (by
  the recipe's plan, or `plan`), and an imported base with the prompts fitted to it."""
  check_inputs(recipe, data_dir, base)
  if recipe.data == "world":
    return Prepared(recipe)
  assert data_dir is not None  # check_inputs: real data needs it
  data_dir = str(paths.path(data_dir))
  plan = plan or real_data.data_plan(recipe, seed)
  record = real_data.prepare_data(data_dir, workdir, plan, log)
  dirs = real_data.data_dirs(workdir)
  prepared = Prepared(
    real_data.with_run_values(recipe, plan, dirs, base),
    heldout=dirs["heldout"],
    extra={"data": {"dir": data_dir, **record}, "base": base},
  )
  if recipe.base == "import":
    assert base is not None
    num_mem = recipe_lib.stage_config(recipe.train[0], prepared.recipe).tokenizer.num_mem_tokens
    prepared.stage_metrics["lm"] = real_data.import_base(base, workdir, num_mem, log)
    prepared.recipe = real_data.fit_recipe(prepared.recipe, workdir, dirs, log)
  return prepared


def train_stages(prepared: Prepared, workdir: str, seed: int, log: Callable[[str], None]) -> None:
  """Every stage of the recipe in order; after a trained base (`lm`) on real data, the
  generator prompts are fitted to its tokenizer; before stage2 over cached memories,
  the cache is built."""
  recipe = prepared.recipe
  dirs = real_data.data_dirs(workdir)
  for stage in recipe.train:
    if stage == "stage2" and prepared.recipe.memory_cache:
      real_data.build_memory_cache(workdir, dirs, log)
    prepared.stage_metrics[stage] = run_stage(stage, workdir, prepared.recipe, seed, log)
    if stage == "lm" and recipe.data == "real":
      prepared.recipe = real_data.fit_recipe(prepared.recipe, workdir, dirs, log)


def run(
  recipe: Union[str, Recipe],
  workdir: str,
  quick: bool = False,
  seed: int = 0,
  data_dir: Optional[str] = None,
  base: Optional[str] = None,
  log: Callable[[str], None] = print,
) -> Dict[str, Any]:
  """The pipeline of `recipe` (a name under configs/recipes/, a recipe directory, or a
  loaded `Recipe`) in `workdir`; returns (and writes) the summary."""
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()  # one progress line per logging step is ours
  if isinstance(recipe, str):
    recipe = recipe_lib.load(recipe, quick)
  workdir = str(paths.path(workdir))
  paths.makedirs(workdir)
  start = time.perf_counter()
  prepared = prepare(recipe, workdir, seed, data_dir, base, log)
  train_stages(prepared, workdir, seed, log)
  finished = evaluation.Finished(workdir, prepared.recipe, seed, prepared.heldout, log)
  results = evaluation.evaluate(finished)
  table = evaluation.claims(prepared.recipe, results)
  seconds = time.perf_counter() - start
  return report.write_report(
    workdir, prepared.recipe, prepared.stage_metrics, results, table, seconds, log, prepared.extra
  )


def run_seeds(
  recipe: Union[str, Recipe],
  workdir: str,
  seeds: List[int],
  quick: bool = False,
  log: Callable[[str], None] = print,
) -> Dict[str, Any]:
  """The pipeline at each seed (in `workdir/seed<N>`), then the claims over every seed's
  questions pooled (`hidden.pool_seeds`) beside each seed's verdict; writes
  `workdir/seeds_summary.json`. The generated world's evaluation only."""
  from clara_jax.eval import hidden

  if isinstance(recipe, str):
    recipe = recipe_lib.load(recipe, quick)
  if recipe.evaluation != "hidden_world":
    raise ValueError(f"recipe {recipe.name!r}: seeds are pooled for the generated world only")
  dirs = {seed: paths.join(workdir, f"seed{seed}") for seed in seeds}
  per_seed = {seed: run(recipe, dirs[seed], quick, seed, log=log) for seed in seeds}
  k = recipe_lib.stage_config("stage2", recipe, seeds[0]).clara.k
  pooled = hidden.claims(hidden.pool_seeds(dirs, k), recipe.min_memory_gain)
  if not recipe.judged:
    pooled = evaluation.unjudged(pooled)
  verdicts = {seed: {c["claim"]: c["passed"] for c in s["claims"]} for seed, s in per_seed.items()}
  summary = {
    "seeds": seeds,
    "recipe": dataclasses.asdict(recipe),
    "claims": report.claim_dicts(pooled),
    "per_seed": {str(seed): s["claims"] for seed, s in per_seed.items()},
    "provenance": report.provenance(),
  }
  paths.write_json(paths.join(workdir, report.SEEDS_SUMMARY_FILE), summary, default=str)
  log("\n" + report.format_seeds_table(pooled, verdicts))
  return summary
