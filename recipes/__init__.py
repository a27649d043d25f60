"""One module per published recipe; each holds one :class:`kd.recipe.DistillationRecipe`."""
