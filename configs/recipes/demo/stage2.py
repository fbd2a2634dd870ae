"""The demo's `stage2` (configs/recipes/demo/README.md); variants: `quick`, `seed=N`."""

from configs.recipes.demo.recipe import recipe_config


def get_config(arg=None):
  return recipe_config("stage2", arg)


def sweep(add):
  # The generator's rate around the recipe's 1e-3; the reasoner keeps twice it.
  for lr in (5e-4, 1e-3, 2e-3):
    add(**{"optimizer.lr": lr})
