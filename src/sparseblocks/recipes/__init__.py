"""Models and training recipes built on the library: a small GPT and ViT, their data, training state, the
pruning experiments and the demo. Not imported by ``import sparseblocks``."""

from sparseblocks.recipes.training import load_recipe_model

__all__ = ["load_recipe_model"]
