"""Datasets and LightningDataModules.

Batch conventions (what a recipe receives):

* classification: ``{"inputs": float (B, ...), "labels": long (B,)}``; a label of
  :data:`IGNORE_INDEX` marks an example without a gold label (it still feeds the
  teacher's soft targets, as in Hinton's transfer set).
"""

IGNORE_INDEX = -100
