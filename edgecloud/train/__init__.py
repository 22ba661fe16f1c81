"""Training: recipes (YAML), the multi-exit training loop, threshold selection, export."""

from edgecloud.train.loop import finalize, load_checkpoint, run_training
from edgecloud.train.recipe import Recipe, list_recipes, load_recipe

__all__ = ["Recipe", "finalize", "list_recipes", "load_checkpoint", "load_recipe", "run_training"]
