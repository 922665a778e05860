"""Figures of generated samples: point clouds, trajectories, image grids and learned 2-D fields."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _axes(ax, figsize=(4, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_points(samples: Tensor, *, reference: Tensor | None = None, ax=None, title: str | None = None):
    """Scatter 2-D samples (and a reference set in grey). Returns the Axes."""
    ax = _axes(ax)
    if reference is not None:
        r = np.asarray(reference)
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label="held out")
    s = np.asarray(samples)
    ax.scatter(s[:, 0], s[:, 1], s=2, c="C0", label="generated")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4, fontsize=7)
    if title:
        ax.set_title(title)
    return ax


def plot_trajectories(samples: Tensor, *, reference: Tensor | None = None, n: int = 4, ax=None, title: str | None = None):
    """Positions ``q1`` (solid) and ``q2`` (dashed) over time for a few trajectories ``[N, T, 4]``."""
    ax = _axes(ax, (6, 3))
    for sets, colour, label in ((reference, "0.6", "held out"), (samples, "C0", "generated")):
        if sets is None:
            continue
        arr = np.asarray(sets)[:n]
        for i, tr in enumerate(arr):
            ax.plot(tr[:, 0], c=colour, lw=1, label=label if i == 0 else None)
            ax.plot(tr[:, 2], c=colour, lw=1, ls="--")
    ax.set_xlabel("time step")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return ax


def image_grid(images: Tensor, *, nrow: int = 10) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` in ``[-1, 1]`` into one array ``[rows*H, nrow*W(, C)]`` in ``[0, 1]``."""
    x = ((torch.as_tensor(images).clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    grid = np.zeros((c, rows * (h + 1), nrow * (w + 1)))
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = x[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def plot_images(images: Tensor, *, nrow: int = 10, ax=None, title: str | None = None):
    """An image grid. Returns the Axes."""
    grid = image_grid(images, nrow=nrow)
    ax = _axes(ax, (nrow * 0.5, grid.shape[0] / grid.shape[1] * nrow * 0.5 + 0.3))
    ax.imshow(grid, cmap="gray_r" if grid.ndim == 2 else None, vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax


@torch.no_grad()
def plot_field(model, *, sigma: float, lim: float = 4.5, n: int = 21, ax=None, title: str | None = None):
    """Arrows of a learned 2-D field ``model(x, sigma)`` on a grid. Returns the Axes."""
    ax = _axes(ax)
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.ravel(), yy.ravel()], 1)
    dev = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
    f = model(pts.to(dev), sigma).cpu() * sigma**2
    ax.quiver(pts[:, 0], pts[:, 1], f[:, 0], f[:, 1], angles="xy", scale_units="xy", scale=2.0, width=0.004)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def save_sample_figure(samples: Tensor, kind: str, path, *, reference: Tensor | None = None) -> None:
    """Write the figure that suits ``kind`` (``'points'``, ``'trajectories'``, ``'images'``) to ``path``.

    Uses a standalone Agg figure, so it neither needs nor changes the pyplot backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize={"points": (4, 4), "trajectories": (6, 3)}.get(kind, (5, 5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if kind == "points":
        plot_points(samples, reference=reference, ax=ax)
    elif kind == "trajectories":
        plot_trajectories(samples, reference=reference, ax=ax)
    else:
        plot_images(samples[:100], ax=ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
