"""The demo's `lm_edit` (configs/recipes/demo/README.md); variants: `quick`, `seed=N`."""

from configs.recipes.demo.recipe import recipe_config


def get_config(arg=None):
  return recipe_config("lm_edit", arg)
