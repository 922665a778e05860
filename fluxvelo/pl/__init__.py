"""Plots: velocities in an embedding (stream, grid, arrows), phase portraits with the fitted field, results."""

from ._embedding import velocity_embedding, velocity_embedding_grid, velocity_embedding_stream
from ._metrics import cbc_bars, loss_curve
from ._phase import phase_portrait

__all__ = [
    "cbc_bars",
    "loss_curve",
    "phase_portrait",
    "velocity_embedding",
    "velocity_embedding_grid",
    "velocity_embedding_stream",
]
