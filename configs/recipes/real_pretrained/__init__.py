"""The `clara-jax real-data --base` recipe (a pretrained base, frozen): `recipe.py`, and
one config file per stage."""
