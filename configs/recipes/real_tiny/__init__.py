"""The `clara-jax real-data` recipe from scratch (the `tiny` model): `recipe.py`, and one
config file per stage."""
