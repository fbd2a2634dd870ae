"""Real-data `stage2` on a pretrained base (configs/recipes/real_pretrained/README.md);
variants: `quick`, `seed=N`."""

from configs.recipes.real_pretrained.recipe import recipe_config


def get_config(arg=None):
  return recipe_config("stage2", arg)
