"""Recipes: a pipeline's stage configs as files, one per stage (`recipes/demo/`)."""
