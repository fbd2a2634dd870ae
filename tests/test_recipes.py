"""The demo's recipe as config files (configs/recipes/demo/): each stage file gives the
config the pipeline (`clara-jax demo`) trains that stage with, and loads through
`clara-jax train`."""

import importlib
import os

import pytest

from clara_jax.pipeline import recipe as recipe_lib
from clara_jax.pipeline import world
from configs.base import validate
from configs.recipes.common import apply_overrides
from configs.recipes.demo import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage_file(stage):
  return importlib.import_module(f"configs.recipes.demo.{stage}")


def test_every_pipeline_stage_has_a_file():
  stages = recipe_lib.load("demo").train + world.EDIT_STAGES
  assert set(recipe.STAGES) == set(stages) == set(recipe_lib.load("demo").stages)
  for stage in recipe.STAGES:
    assert os.path.exists(os.path.join(ROOT, "configs", "recipes", "demo", f"{stage}.py"))


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("stage", recipe.STAGES)
def test_stage_files_are_the_demos_configs(stage, quick):
  """The file's config is the pipeline's (before run-time values), and it validates."""
  config = _stage_file(stage).get_config("quick" if quick else None)
  expected = recipe_lib.stage_config(stage, recipe_lib.load("demo", quick))
  assert config.to_dict() == expected.to_dict()
  assert repr(config.to_dict()) == repr(expected.to_dict())  # tuples stay tuples
  validate(config)


@pytest.mark.parametrize("quick", [False, True])
def test_pinned_recipe_values(quick):
  """A few of the recipe's values, so the files cannot drift from it unnoticed."""
  arg = "quick" if quick else ""
  get = lambda stage: _stage_file(stage).get_config(arg)
  assert get("stage1").train.num_steps == (40 if quick else 2500)
  assert get("lm").train.num_steps == (60 if quick else 1500)
  assert get("lm_edit").train.num_steps == (10 if quick else 100)
  for stage in recipe.STAGES:
    c = get(stage)
    assert c.clara.compr_rate == 2 and c.model_size == "tiny" and c.model.tie_embeddings
    assert c.data.synth_names == "pool" and c.data.synth_size == ("tiny" if quick else "small")
    assert c.data.shuffle_answers == (stage == "stage2_shuffled")
  for stage in ("stage2", "stage2_shuffled"):
    c = get(stage)
    assert c.stage == "stage2" and c.clara.k == 1 and c.optimizer.lr == 1e-3
    assert c.optimizer.lr_multipliers == ((".*/lora_reasoner/.*", 2.0),)
  assert get("stage1").data.replay_text == "world" and get("stage1").clara.train_base
  assert get("lm_sham").init.from_workdir == "../stage2" and get("lm_sham").data.source == ""
  r = recipe_lib.load("demo", quick)
  assert r.eval_questions == (24 if quick else None) and r.min_memory_gain == 1.0
  assert r.judged is not quick


def test_variants():
  c = _stage_file("stage1").get_config("quick,seed=3")
  assert c.seed == c.data.synth_seed == 3 and c.train.num_steps == 40
  assert (
    c.to_dict()
    == recipe_lib.stage_config("stage1", recipe_lib.load("demo", True), seed=3).to_dict()
  )
  with pytest.raises(ValueError, match="unknown recipe variant 'runlocal'"):
    _stage_file("stage1").get_config("runlocal")


def test_a_loaded_recipe_has_fresh_dicts():
  """Callers build their own recipes from it (the real-data runs, the stage1 study)."""
  recipe_lib.load("demo").stages["stage1"]["train.num_steps"] = 1
  recipe_lib.load("demo").shared["clara.k"] = 9
  assert recipe_lib.load("demo").stages["stage1"]["train.num_steps"] == 2500
  assert recipe_lib.load("demo").shared["clara.k"] == 2
  # with_overrides copies too.
  demo = recipe_lib.load("demo")
  changed = recipe_lib.with_overrides(demo, {"clara.k": 3}, {"stage1": {"optimizer.lr": 1.0}})
  assert changed.shared["clara.k"] == 3 and changed.stages["stage1"]["optimizer.lr"] == 1.0
  assert demo == recipe_lib.load("demo")


def test_the_pipeline_declarations():
  demo = recipe_lib.load("demo")
  assert (demo.data, demo.base, demo.evaluation, demo.memory_cache) == (
    "world",
    "lm",
    "hidden_world",
    False,
  )
  assert demo.train == ("lm", "stage1", "stage1_2", "stage2", "stage2_shuffled", "stage2_retrieval")
  assert demo.data_plan is None and demo.config_of["lm_edit"] == "lm"
  assert recipe_lib.known_recipes() == ("demo", "real_pretrained", "real_tiny")


def test_sweep_points_validate():
  points = []
  _stage_file("stage2").sweep(lambda **overrides: points.append(overrides))
  assert points
  for overrides in points:
    validate(apply_overrides(_stage_file("stage2").get_config(), overrides))


def test_an_override_of_no_field_is_named():
  """A typo in a recipe must not create a field the stage never reads."""
  demo = recipe_lib.load("demo")
  typo = recipe_lib.with_overrides(demo, {}, {"stage1": {"optimizer.lrr": 1.0}})
  with pytest.raises(ValueError, match=r"stage 'stage1': override 'optimizer.lrr': no such"):
    recipe_lib.stage_config("stage1", typo)
  with pytest.raises(
    ValueError, match=r"override 'optimiser.lr': no such config field 'optimiser'"
  ):
    apply_overrides(recipe_lib.stage_config("stage1", demo), {"optimiser.lr": 1.0})
