"""A recipe directory read: `recipe.py` there holds the overrides of each stage's config
and what the pipeline does with them (configs/recipes/common.py lists the names it
declares). `clara-jax pipeline --recipe demo` names one of `configs/recipes/`; a path to
a directory with a `recipe.py` names any other."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

import ml_collections

RECIPE_FILE = "recipe.py"
DATA_KINDS = ("world", "real")
BASE_KINDS = ("lm", "import")
EVALUATIONS = ("hidden_world", "checkpoints", "real")


def recipes_root() -> str:
  """`configs/recipes/` of the installed `configs` package."""
  import configs.recipes

  return os.path.dirname(os.path.abspath(configs.recipes.__file__))


def known_recipes() -> Tuple[str, ...]:
  root = recipes_root()
  return tuple(
    sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, RECIPE_FILE)))
  )


def recipe_module(name_or_dir: str) -> ModuleType:
  """The `recipe.py` module of a recipe: a name under `configs/recipes/` (imported as
  `configs.recipes.<name>.recipe`, the module its stage files import) or a directory."""
  if os.path.isfile(os.path.join(name_or_dir, RECIPE_FILE)):
    directory = os.path.abspath(name_or_dir)
    if os.path.dirname(directory) != recipes_root():
      spec = importlib.util.spec_from_file_location(
        f"clara_recipe_{os.path.basename(directory)}", os.path.join(directory, RECIPE_FILE)
      )
      assert spec is not None and spec.loader is not None
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      return module
    name_or_dir = os.path.basename(directory)
  if name_or_dir not in known_recipes():
    raise FileNotFoundError(
      f"recipe {name_or_dir!r}: neither a directory with a {RECIPE_FILE} nor one of "
      f"{', '.join(known_recipes())}"
    )
  return importlib.import_module(f"configs.recipes.{name_or_dir}.recipe")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A recipe as the pipeline runs it. `shared`, `stages`: config overrides (dotted
  keys) for every stage and per stage; `train`: the stages trained, in order; `data`,
  `base`, `evaluation`, `memory_cache`: see configs/recipes/common.py; `data_plan`:
  the `DataPlan` fields of a real-data recipe (None: the generated world);
  `eval_questions`: held-out questions evaluated (None: all; else each kind sampled
  evenly); `min_memory_gain`: claim (a)'s threshold, nats per answer token; `judged`:
  False in the quick variant (too few steps for any claim: rows get no verdict)."""

  name: str
  model: str
  shared: Dict[str, Any]
  stages: Dict[str, Dict[str, Any]]
  train: Tuple[str, ...]
  data: str
  base: str
  evaluation: str
  memory_cache: bool
  data_plan: Optional[Dict[str, Any]]
  eval_questions: Optional[int]
  min_memory_gain: float
  judged: bool
  config_of: Dict[str, str] = dataclasses.field(default_factory=dict)


def _declared(module: ModuleType, field: str, choices: Tuple[str, ...]) -> str:
  value = getattr(module, field, None)
  if value not in choices:
    raise ValueError(
      f"{module.__file__}: {field} = {value!r}; expected one of {', '.join(choices)}"
    )
  return value


def load(name_or_dir: str, quick: bool = False) -> Recipe:
  """The recipe, or its quick variant (a few steps per stage, unjudged)."""
  module = recipe_module(name_or_dir)
  data = _declared(module, "DATA", DATA_KINDS)
  shared, stages = module.overrides(quick)
  unknown = [stage for stage in module.TRAIN if stage not in stages]
  if unknown:
    raise ValueError(f"{module.__file__}: TRAIN names stages without overrides: {unknown}")
  return Recipe(
    name=os.path.basename(os.path.dirname(os.path.abspath(str(module.__file__)))),
    model=module.MODEL,
    shared=shared,
    stages=stages,
    train=tuple(module.TRAIN),
    data=data,
    base=_declared(module, "BASE", BASE_KINDS),
    evaluation=_declared(module, "EVALUATION", EVALUATIONS),
    memory_cache=bool(module.MEMORY_CACHE),
    data_plan=(module.QUICK_DATA_PLAN if quick else module.DATA_PLAN) if data == "real" else None,
    eval_questions=module.QUICK_EVAL_QUESTIONS if quick else module.EVAL_QUESTIONS,
    min_memory_gain=module.MIN_MEMORY_GAIN,
    judged=not quick,
    config_of=dict(getattr(module, "CONFIG_OF", {})),
  )


def stage_config(
  stage: str, recipe: Recipe, seed: int = 0, extra: Optional[Dict[str, Any]] = None
) -> ml_collections.ConfigDict:
  """The stage's config file (`configs/STAGE.py`, or the one `config_of` names) with the
  recipe applied, then `extra` (dotted keys known only at run time, e.g. a path in the
  workdir)."""
  from configs.recipes.common import build_config

  values = {**recipe.shared, **recipe.stages.get(stage, {}), **(extra or {})}
  return build_config(stage, recipe.model, values, seed, recipe.config_of)


def with_overrides(
  recipe: Recipe,
  shared: Dict[str, Any],
  stages: Optional[Dict[str, Dict[str, Any]]] = None,
  **fields: Any,
) -> Recipe:
  """The recipe with `shared` and `stages` (per stage) overrides added, and `fields`
  replaced; the dicts are copied, the recipe left as it was."""
  merged = {name: dict(values) for name, values in recipe.stages.items()}
  for name, values in (stages or {}).items():
    merged.setdefault(name, {}).update(values)
  return dataclasses.replace(recipe, shared={**recipe.shared, **shared}, stages=merged, **fields)
