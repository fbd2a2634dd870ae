"""What every recipe file (`configs/recipes/<name>/recipe.py`) builds its stage configs
with: the `quick` variant of its overrides, the variant string of its stage files, and a
stage's config from its `configs/` file with the overrides applied.

A recipe file declares, besides its overrides (`SHARED`, `STAGE_OVERRIDES`, `QUICK_*`),
what the pipeline runner (`clara_jax.pipeline`) does with it:

* `DATA`: "world" (the generated world; every stage writes its own from the seed) or
  "real" (the QA files of `--data_dir`, converted and split by `DATA_PLAN`, or
  `QUICK_DATA_PLAN` in the quick variant);
* `BASE`: "lm" (the `lm` stage trains the base) or "import" (the `--base` model is
  imported as the `lm` stage's export and stays frozen);
* `TRAIN`: the stages trained, in order; each resumes from its checkpoint and a
  finished one is skipped;
* `EVALUATION`: "hidden_world" (the generated world's hidden-reasoning evaluation and
  causal edit), "checkpoints" (evaluation and lens of stage2 against its initial
  reasoner) or "real" (real questions on a pretrained base);
* `MEMORY_CACHE`: whether stage2 reads the stage1_2 compressor's cached memories.
"""

import copy
import importlib

VARIANTS = ("quick", "seed=N")


def with_variant(shared, stage_overrides, quick, quick_shared, quick_steps, quick_stage=None):
  """(shared, per-stage) override dicts of a recipe, or of its `quick` variant
  (`quick_shared` on top of `shared`, each stage's steps from `quick_steps` and the
  values `quick_stage` in every stage); fresh copies, so a caller may change them."""
  shared = copy.deepcopy(shared)
  stages = copy.deepcopy(stage_overrides)
  if quick:
    shared.update(quick_shared)
    for stage, steps in quick_steps.items():
      stages[stage].update({"train.num_steps": steps, **(quick_stage or {})})
  return shared, stages


def build_config(stage, model, values, seed=0, config_of=None):
  """`configs/<module>.py` for `model` (the module is `config_of.get(stage, stage)`),
  seeded, with `values` (dotted keys) applied in order."""
  module = importlib.import_module(f"configs.{(config_of or {}).get(stage, stage)}")
  config = module.get_config(f"model={model}")
  # One seed for the parameters and the generated world: a pipeline's stages share it.
  config.seed = seed
  config.data.synth_seed = seed
  return apply_overrides(config, values, f"stage {stage!r}")


def apply_overrides(config, values, where="config"):
  """`config` with `values` (dotted keys, e.g. "optimizer.lr") set in order; a key that
  names no field of the config is a ValueError naming it and `where` it came from (a
  typo must not create a field the stage never reads)."""
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      if part not in node:
        raise ValueError(f"{where}: override {key!r}: no such config field {part!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"{where}: override {key!r}: no such config field")
    node[leaf] = value
  return config


def parse_variant(arg):
  """'quick,seed=1' -> (True, 1). A recipe's own words: the stage config underneath gets
  the recipe's model, so the stage configs' variants (configs/base.py) do not apply."""
  quick, seed = False, 0
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.strip().partition("=")
    if key == "quick" and not value:
      quick = True
    elif key == "seed" and value.strip().isdigit():
      seed = int(value)
    else:
      raise ValueError(f"unknown recipe variant {part!r}; known: {', '.join(VARIANTS)}")
  return quick, seed


def recipe_config(recipe, stage, arg=None):
  """The config of `stage` in the recipe module `recipe`: its configs/ file with the
  shared and the stage's static overrides; `arg` is the variant string, e.g.
  'quick,seed=1'. Run-time values (paths in the workdir, the data plan's `clara.k` and
  `data.candidates`, the memory cache) stay as the stage config's defaults."""
  if stage not in recipe.STAGE_OVERRIDES:
    raise ValueError(
      f"unknown stage {stage!r} of recipe {recipe.__name__}; known: {', '.join(recipe.STAGES)}"
    )
  quick, seed = parse_variant(arg)
  shared, stages = recipe.overrides(quick)
  values = {**shared, **stages[stage]}
  return build_config(stage, recipe.MODEL, values, seed, getattr(recipe, "CONFIG_OF", None))
