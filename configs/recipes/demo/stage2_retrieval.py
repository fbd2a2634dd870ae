"""The demo's `stage2_retrieval` (configs/recipes/demo/README.md); variants: `quick`, `seed=N`."""

from configs.recipes.demo.recipe import recipe_config


def get_config(arg=None):
  return recipe_config("stage2_retrieval", arg)
