"""Preprocessing: scVelo-compatible filtering/normalisation, kNN moments and the paper's recipe."""

from ._filter import filter_and_normalize
from ._moments import moments
from ._recipe import recipe_flux

__all__ = ["filter_and_normalize", "moments", "recipe_flux"]
