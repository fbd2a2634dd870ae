"""The real-data recipes as config files (configs/recipes/real_tiny/, real_pretrained/):
each stage file's config is the pipeline's on the static keys the recipe sets, and
validates; a few values pinned from the recipes, so the files cannot drift unnoticed."""

import importlib

import pytest

from clara_jax.pipeline import real_data
from clara_jax.pipeline import recipe as recipe_lib
from configs.base import validate
from configs.recipes.real_pretrained import recipe as pretrained
from configs.recipes.real_tiny import recipe as tiny

RECIPES = {"real_tiny": tiny, "real_pretrained": pretrained}
CASES = [(name, stage) for name, module in RECIPES.items() for stage in module.STAGES]


def _pipeline_recipe(name, quick, tmp_path, plan=None):
  recipe = recipe_lib.load(name, quick)
  plan = plan or real_data.data_plan(recipe)
  dirs = real_data.data_dirs(str(tmp_path))
  return real_data.with_run_values(recipe, plan, dirs, "smollm2")


def _get(config, key):
  for part in key.split("."):
    config = config[part]
  return config


def _file_config(name, stage, arg):
  return importlib.import_module(f"configs.recipes.{name}.{stage}").get_config(arg)


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("name,stage", CASES)
def test_stage_files_are_the_pipelines_configs(name, stage, quick, tmp_path):
  """On every static key the file sets, its config is `real-data`'s; it validates."""
  config = _file_config(name, stage, "quick" if quick else None)
  validate(config)
  expected = recipe_lib.stage_config(stage, _pipeline_recipe(name, quick, tmp_path))
  shared, stages = RECIPES[name].overrides(quick)
  for key in {**shared, **stages[stage]}:
    assert repr(_get(config, key)) == repr(_get(expected, key)), key  # tuples stay tuples
  assert config.model_size == expected.model_size == RECIPES[name].MODEL


def test_every_pipeline_stage_has_a_file(tmp_path):
  assert tiny.STAGES == tiny.TRAIN == ("lm", "stage1", "stage1_2", "stage2")
  assert pretrained.STAGES == pretrained.TRAIN == ("stage1", "stage1_2", "stage2")
  for name in RECIPES:
    assert tuple(_pipeline_recipe(name, False, tmp_path).stages) == RECIPES[name].STAGES


def _configs(name, quick):
  """{stage: the stage file's config} of a recipe, or of its quick variant."""
  arg = "quick" if quick else ""
  return {stage: _file_config(name, stage, arg) for stage in RECIPES[name].STAGES}


@pytest.mark.parametrize("quick", [False, True])
def test_pinned_real_tiny_values(quick, tmp_path):
  configs = _configs("real_tiny", quick)
  steps = (40, 20, 20, 20) if quick else (1500, 1500, 400, 400)
  batches = (8, 8, 8, 8) if quick else (32, 16, 16, 8)
  for c, n, batch in zip(configs.values(), steps, batches):
    assert c.clara.compr_rate == 4 and c.data.prompt_style == "short"
    assert c.clara.doc_max_length == (64 if quick else 128)
    assert c.tokenizer.num_mem_tokens == (16 if quick else 32)
    assert c.tokenizer.vocab_size == (1024 if quick else 4096)
    assert (c.train.num_steps, c.train.global_batch) == (n, batch)
  assert configs["stage1"].data.answer_length == 64 and configs["stage1_2"].clara.train_base
  c = configs["stage2"]
  assert c.clara.k == 1 and not c.clara.train_generator and c.optimizer.schedule == "cosine"
  r = _pipeline_recipe("real_tiny", quick, tmp_path)
  assert (r.model, r.eval_questions, r.min_memory_gain) == ("tiny", 16 if quick else 200, 1.0)
  assert r.judged is not quick


@pytest.mark.parametrize("quick", [False, True])
def test_pinned_real_pretrained_values(quick, tmp_path):
  configs = _configs("real_pretrained", quick)
  steps = (6, 4, 4) if quick else (150, 60, 100)
  for c, n, lr in zip(configs.values(), steps, (3e-3, 5e-4, 5e-4)):
    assert c.clara.compr_rate == 8 and c.data.prompt_style == "reference"
    assert c.tokenizer.num_mem_tokens == (8 if quick else 16)
    assert c.clara.memory_scale == "embedding" and not c.clara.train_base
    assert (c.clara.lexical_weight, c.clara.mse_weight) == (1.0, 0.0)
    assert c.train.global_batch == 8 and (c.train.num_steps, c.optimizer.lr) == (n, lr)
  assert configs["stage2"].optimizer.lr_multipliers == ((".*/lora_reasoner/.*", 2.0),)
  assert configs["stage2"].clara.train_generator
  r = _pipeline_recipe("real_pretrained", quick, tmp_path)
  assert (r.eval_questions, r.min_memory_gain, r.judged) == (8 if quick else None, 1.0, not quick)


def test_run_time_values_come_from_the_run(tmp_path):
  """The plan, paths, memory cache and model reach the recipe; the files keep defaults."""
  plan = real_data.DataPlan(limits={}, test={}, candidates=7, k=5)
  dirs = real_data.data_dirs(str(tmp_path))
  r = real_data.with_run_values(recipe_lib.load("real_pretrained"), plan, dirs, "base.gguf")
  assert r.model == "tiny" and (r.shared["clara.k"], r.shared["data.candidates"]) == (5, 7)
  assert r.stages["stage2"]["data.memory_cache"] == str(tmp_path / "memories")
  assert all(r.stages[s]["data.source"] == dirs[s] for s in pretrained.STAGES)
  r = real_data.with_run_values(recipe_lib.load("real_pretrained"), plan, dirs, "smollm2")
  assert r.model == "smollm2_135m"
  r = real_data.with_run_values(recipe_lib.load("real_tiny"), plan, dirs)
  assert (r.shared["clara.k"], r.shared["data.candidates"]) == (5, 7)
  assert all(r.stages[s]["data.source"] == dirs[s] for s in tiny.STAGES)
  for module in RECIPES.values():
    shared, stages = module.overrides()
    assert not {"clara.k", "data.candidates"} & set(shared)
    assert all("data.source" not in o and "data.memory_cache" not in o for o in stages.values())


def test_variants_and_fresh_dicts():
  c = _file_config("real_tiny", "stage1", "quick,seed=3")
  assert c.seed == c.data.synth_seed == 3 and c.train.num_steps == 20
  with pytest.raises(ValueError, match="unknown recipe variant 'runlocal'"):
    _file_config("real_pretrained", "stage1", "runlocal")
  with pytest.raises(ValueError, match="unknown stage 'lm'"):
    pretrained.recipe_config("lm")
  tiny.overrides()[1]["stage1"]["train.num_steps"] = 1
  assert tiny.overrides()[1]["stage1"]["train.num_steps"] == 1500
