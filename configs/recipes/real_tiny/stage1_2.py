"""Real-data `stage1_2` from scratch (configs/recipes/real_tiny/README.md); variants:
`quick`, `seed=N`."""

from configs.recipes.real_tiny.recipe import recipe_config


def get_config(arg=None):
  return recipe_config("stage1_2", arg)
