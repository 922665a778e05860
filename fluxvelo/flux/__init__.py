"""The Flux Matching estimator: kernel score, rollout, target and loss. No AnnData here."""

from ._estimator import FluxLoss, field_divergence, flux_matching_loss
from ._reference import reference_loss
from ._kernel import kernel_mean_offset, pull_back, score, score_gradient_terms

__all__ = [
    "FluxLoss",
    "field_divergence",
    "flux_matching_loss",
    "kernel_mean_offset",
    "pull_back",
    "reference_loss",
    "score",
    "score_gradient_terms",
]
