"""The `clara-jax demo` pipeline's recipe: `recipe.py`, and one config file per stage."""
