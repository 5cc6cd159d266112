"""Masks, magnitude criteria and sparsity schedules."""

from sparse_core.sparsity.criteria import filter_masks, magnitude_masks, n_keep
from sparse_core.sparsity.masks import LAYER_TABLE_SCHEMA, MaskSet, prunable_parameters
from sparse_core.sparsity.schedules import cubic_sparsity

__all__ = [
    "LAYER_TABLE_SCHEMA",
    "MaskSet",
    "cubic_sparsity",
    "filter_masks",
    "magnitude_masks",
    "n_keep",
    "prunable_parameters",
]
