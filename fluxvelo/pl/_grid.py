"""Gaussian-kernel smoothing of embedded velocities onto a regular grid (scVelo's ``compute_velocity_on_grid``)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def quiver_scale(X: np.ndarray, V: np.ndarray) -> float:
    """Matplotlib's quiver autoscale for arrows ``V`` at ``X`` (scVelo divides arrows by 3x it)."""
    from matplotlib.figure import Figure

    factor = np.abs(X).max()
    ax = Figure().add_subplot()
    q = ax.quiver(X[:, 0] / factor, X[:, 1] / factor, V[:, 0], V[:, 1], angles="xy", scale_units="xy", scale=None)
    q._init()
    return float(q.scale) / factor


def velocity_on_grid(
    X: np.ndarray,
    V: np.ndarray,
    *,
    density: float = 1.0,
    smooth: float = 0.5,
    n_neighbors: int | None = None,
    min_mass: float = 1.0,
    autoscale: bool = True,
    for_stream: bool = False,
    cutoff_perc: float = 5.0,
):
    """Average cell velocities ``V`` at embedding positions ``X`` onto a ``50 * density`` square grid.

    Each grid point takes the Gaussian-weighted sum of its ``n_neighbors`` nearest cells' velocities (bandwidth
    ``smooth`` times the grid spacing), divided by ``max(1, total weight)``.

    Returns
    -------
    ``for_stream=False``: grid points ``(m, 2)`` and velocities ``(m, 2)``, keeping points whose total weight
    exceeds ``min_mass`` % of its 99th percentile, velocities autoscaled for a quiver plot when ``autoscale``.
    ``for_stream=True``: the axes ``(xs, ys)`` and velocities ``(2, len(ys), len(xs))`` with NaN where the weight
    is below ``10 ** (min_mass - 6)`` or the local speed below its ``cutoff_perc`` percentile.
    """
    X = np.asarray(X, dtype=np.float64)[:, :2]
    V = np.asarray(V, dtype=np.float64)[:, :2]
    valid = np.isfinite(X).all(1) & np.isfinite(V).all(1)
    X, V = X[valid], V[valid]
    n = len(X)
    if n == 0:
        raise ValueError("No cell has a finite embedding position and velocity.")

    lo, hi = X.min(0), X.max(0)
    lo = lo - 0.01 * (hi - lo)
    hi = hi + 0.01 * (hi - lo)
    n_points = int(50 * density)
    if n_points < 2:
        raise ValueError(f"density={density} gives fewer than 2 grid points per axis.")
    axes = [np.linspace(lo[d], hi[d], n_points) for d in range(2)]
    grid = np.column_stack([g.ravel() for g in np.meshgrid(*axes)])  # x varies fastest

    k = int(n / 50) if n_neighbors is None else int(n_neighbors)
    k = min(max(k, 1), n)
    dist, idx = cKDTree(X).query(grid, k=[*range(1, k + 1)])
    bandwidth = np.mean([a[1] - a[0] for a in axes]) * smooth
    weight = np.exp(-0.5 * (dist / bandwidth) ** 2) / (np.sqrt(2 * np.pi) * bandwidth)
    mass = weight.sum(1)
    V_grid = np.einsum("gk,gkd->gd", weight, V[idx]) / np.maximum(1, mass)[:, None]

    if for_stream:
        V_grid = V_grid.T.reshape(2, n_points, n_points)
        speed = np.sqrt((V_grid**2).sum(0))
        cutoff = speed < np.clip(10 ** (min_mass - 6), None, 0.9 * speed.max())
        length = np.abs(V[idx]).mean(1).sum(1).reshape(n_points, n_points)
        cutoff |= length < np.percentile(length, cutoff_perc)
        V_grid[:, cutoff] = np.nan
        return axes, V_grid

    keep = mass > min_mass * np.percentile(mass, 99) / 100
    grid, V_grid = grid[keep], V_grid[keep]
    if autoscale and np.any(V_grid != 0):
        V_grid = V_grid / (3 * quiver_scale(grid, V_grid))
    return grid, V_grid
