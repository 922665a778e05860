"""The Flux Matching estimator: kernel score, rollout, target and loss. No AnnData here.

Names are loaded on first access, so that importing one of its numba kernel modules (as the processes that compile
them ahead of a fit do) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {
    "FluxLoss": "_estimator",
    "field_divergence": "_estimator",
    "flux_matching_loss": "_estimator",
    "reference_loss": "_reference",
    "kernel_mean_offset": "_kernel",
    "pull_back": "_kernel",
    "score": "_kernel",
    "score_gradient_terms": "_kernel",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:
    from ._estimator import FluxLoss, field_divergence, flux_matching_loss
    from ._kernel import kernel_mean_offset, pull_back, score, score_gradient_terms
    from ._reference import reference_loss


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
