"""Velocities in an embedding: streamlines, grid arrows and per-cell arrows over the cells."""

from __future__ import annotations

import os

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from .. import _keys as keys
from ._grid import velocity_on_grid
from ._utils import (
    add_legend,
    cell_colors,
    check_adata,
    clean_embedding_axes,
    default_size,
    embedding_coords,
    embedding_velocity,
    finish,
    get_ax,
    scatter_cells,
)

__all__ = ["velocity_embedding", "velocity_embedding_grid", "velocity_embedding_stream"]

_COMMON_DOC = """
    color
        obs column (categorical: colours from ``uns['<color>_colors']`` when present, else scanpy's defaults;
        numeric: a colour map), a gene name (values from ``layer``), a matplotlib colour, or None (grey).
    palette
        Colours for the categories: a list, a dict category -> colour, or a colour-map name. Overrides
        ``uns['<color>_colors']``.
    cmap
        Colour map for a continuous ``color``.
    layer
        Layer for a gene ``color``; default ``X``.
    size
        Point size; default ``120000 / n_obs`` (capped at 100).
    legend_loc
        ``'on data'``, ``'right margin'``, a matplotlib legend location, or None.
    legend_fontsize
        Font size of the legend.
    title
        Axes title; default the ``color`` key.
    figsize
        Size of a new figure (when ``ax`` is None).
    ax
        Axes to draw into; a new figure when None.
    show
        Call :func:`matplotlib.pyplot.show`. Default: only for a new figure in interactive mode with an
        interactive backend.
    save
        File path to save the figure to (``True``: ``fluxvelo_<plot>.png``).
"""


def _prepare(adata, basis, vkey, color, palette, cmap, layer, func):
    check_adata(adata, func)
    X = embedding_coords(adata, basis)
    V = embedding_velocity(adata, basis, vkey)
    colors = cell_colors(adata, color, palette=palette, cmap=cmap, layer=layer)
    return X, V, colors


def _draw_cells(ax, adata, X, colors, color, *, size, alpha, legend_loc, legend_fontsize, basis, title):
    size = default_size(adata.n_obs) if size is None else size
    scatter_cells(ax, X, colors, size=size, alpha=alpha, zorder=0)
    add_legend(ax, X, adata, color, colors, legend_loc, legend_fontsize)
    clean_embedding_axes(ax, basis, color if title is None else title)


def velocity_embedding_stream(
    adata: AnnData,
    *,
    basis: str = "umap",
    vkey: str = keys.VELOCITY,
    color: str | None = "clusters",
    density: float = 1.0,
    smooth: float = 0.5,
    n_neighbors: int | None = None,
    min_mass: float = 1.0,
    cutoff_perc: float = 5.0,
    linewidth: float = 1.0,
    arrow_size: float = 1.0,
    arrow_color: str = "k",
    max_length: float = 4.0,
    alpha: float = 0.3,
    palette=None,
    cmap: str = "viridis",
    layer: str | None = None,
    size: float | None = None,
    legend_loc: str | None = "on data",
    legend_fontsize: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Streamlines of the projected velocities over the cells in an embedding (as scVelo's stream plot).

    The projected velocities ``obsm['<vkey>_<basis>']`` are averaged onto a 50 x 50 grid with a Gaussian kernel
    (scVelo's ``compute_velocity_on_grid``); grid points without nearby cells or with the slowest local
    velocities are left empty. Line width grows with the local speed.

    Parameters
    ----------
    adata
        Annotated data with ``obsm['X_<basis>']`` and ``obsm['<vkey>_<basis>']`` (from
        :func:`fluxvelo.tl.velocity_embedding`).
    basis
        Embedding, e.g. ``'umap'``.
    vkey
        Velocity key.
    density
        Closeness of the streamlines (matplotlib's ``streamplot`` density is ``2 * density``, scVelo's default).
    smooth
        Kernel bandwidth as a fraction of the grid spacing.
    n_neighbors
        Cells per grid point; default ``n_obs / 50``.
    min_mass
        Grid points whose speed is below ``10 ** (min_mass - 6)`` are left empty.
    cutoff_perc
        Grid points whose local cell speed is below this percentile are left empty.
    linewidth
        Width of the fastest streamline.
    arrow_size, arrow_color, max_length
        Arrow head size, line and arrow colour, and maximum streamline length (``streamplot``'s ``maxlength``).
    alpha
        Opacity of the cells.
    {common}
    Returns
    -------
    The :class:`~matplotlib.axes.Axes` drawn into.
    """
    X, V, colors = _prepare(adata, basis, vkey, color, palette, cmap, layer, "velocity_embedding_stream")
    (xs, ys), V_grid = velocity_on_grid(
        X, V, smooth=smooth, n_neighbors=n_neighbors, min_mass=min_mass, for_stream=True, cutoff_perc=cutoff_perc
    )
    speed = np.sqrt((V_grid**2).sum(0))
    if not np.isfinite(speed).any() or np.nanmax(speed) == 0:
        raise ValueError(f"obsm['{vkey}_{basis}'] is zero or NaN everywhere; nothing to draw.")
    widths = linewidth * 2 * speed / np.nanmax(speed)

    ax, new = get_ax(ax, figsize)
    ax.streamplot(
        xs,
        ys,
        V_grid[0],
        V_grid[1],
        density=2 * density,
        linewidth=widths,
        color=arrow_color,
        arrowsize=arrow_size,
        arrowstyle="-|>",
        maxlength=max_length,
        integration_direction="both",
        zorder=3,
    )
    _draw_cells(
        ax, adata, X, colors, color, size=size, alpha=alpha, legend_loc=legend_loc, legend_fontsize=legend_fontsize,
        basis=basis, title=title,
    )  # fmt: skip
    return finish(ax, show=show, save=save, new=new, name="velocity_embedding_stream")


def velocity_embedding_grid(
    adata: AnnData,
    *,
    basis: str = "umap",
    vkey: str = keys.VELOCITY,
    color: str | None = "clusters",
    density: float = 1.0,
    smooth: float = 0.5,
    n_neighbors: int | None = None,
    min_mass: float = 1.0,
    arrow_size: float = 1.0,
    arrow_length: float = 1.0,
    arrow_color: str = "grey",
    alpha: float = 0.2,
    palette=None,
    cmap: str = "viridis",
    layer: str | None = None,
    size: float | None = None,
    legend_loc: str | None = "on data",
    legend_fontsize: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Arrows of the projected velocities averaged on a regular grid over the cells (as scVelo's grid plot).

    Parameters
    ----------
    adata
        Annotated data with ``obsm['X_<basis>']`` and ``obsm['<vkey>_<basis>']`` (from
        :func:`fluxvelo.tl.velocity_embedding`).
    basis
        Embedding, e.g. ``'umap'``.
    vkey
        Velocity key.
    density
        Grid points per axis are ``50 * density``.
    smooth
        Kernel bandwidth as a fraction of the grid spacing.
    n_neighbors
        Cells per grid point; default ``n_obs / 50``.
    min_mass
        Grid points whose kernel mass is below ``min_mass`` % of its 99th percentile get no arrow.
    arrow_size, arrow_length, arrow_color
        Head size, length and colour of the arrows. Arrows keep their relative lengths; the 90th-percentile
        arrow is ``arrow_length`` grid spacings long.
    alpha
        Opacity of the cells.
    {common}
    Returns
    -------
    The :class:`~matplotlib.axes.Axes` drawn into.
    """
    X, V, colors = _prepare(adata, basis, vkey, color, palette, cmap, layer, "velocity_embedding_grid")
    grid, V_grid = velocity_on_grid(
        X, V, density=density, smooth=smooth, n_neighbors=n_neighbors, min_mass=min_mass, autoscale=False
    )
    spacing = np.mean((X.max(0) - X.min(0)) * 1.02 / (int(50 * density) - 1))
    V_grid = V_grid * _length_factor(V_grid, arrow_length * spacing)
    ax, new = get_ax(ax, figsize)
    ax.quiver(
        grid[:, 0], grid[:, 1], V_grid[:, 0], V_grid[:, 1], color=arrow_color, zorder=3, scale=1, **_arrow_kw(arrow_size),
    )  # fmt: skip
    _draw_cells(
        ax, adata, X, colors, color, size=size, alpha=alpha, legend_loc=legend_loc, legend_fontsize=legend_fontsize,
        basis=basis, title=title,
    )  # fmt: skip
    return finish(ax, show=show, save=save, new=new, name="velocity_embedding_grid")


def velocity_embedding(
    adata: AnnData,
    *,
    basis: str = "umap",
    vkey: str = keys.VELOCITY,
    color: str | None = "clusters",
    density: float = 1.0,
    arrow_size: float = 1.0,
    arrow_length: float = 1.0,
    alpha: float = 0.2,
    random_state: int | None = 0,
    palette=None,
    cmap: str = "viridis",
    layer: str | None = None,
    size: float | None = None,
    legend_loc: str | None = "on data",
    legend_fontsize: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """One arrow per cell, its projected velocity, coloured like the cell (as scVelo's ``velocity_embedding``).

    Parameters
    ----------
    adata
        Annotated data with ``obsm['X_<basis>']`` and ``obsm['<vkey>_<basis>']`` (from
        :func:`fluxvelo.tl.velocity_embedding`).
    basis
        Embedding, e.g. ``'umap'``.
    vkey
        Velocity key.
    density
        Fraction of the cells (drawn at random) that get an arrow.
    arrow_size, arrow_length
        Head size and length of the arrows. Arrows keep their relative lengths; the 90th-percentile arrow is
        ``arrow_length`` times the typical distance between the drawn cells (``sqrt(area / n)``).
    alpha
        Opacity of the cells under the arrows.
    random_state
        Seed of the subsample when ``density < 1``.
    {common}
    Returns
    -------
    The :class:`~matplotlib.axes.Axes` drawn into.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}.")
    X, V, colors = _prepare(adata, basis, vkey, color, palette, cmap, layer, "velocity_embedding")
    idx = np.flatnonzero(np.isfinite(V).all(1))
    if density < 1:
        rng = np.random.default_rng(random_state)
        idx = np.sort(rng.choice(idx, int(np.ceil(density * idx.size)), replace=False))
    spacing = np.sqrt(np.prod(X.max(0) - X.min(0)) / max(idx.size, 1))
    V = V * _length_factor(V[idx], arrow_length * spacing)
    ax, new = get_ax(ax, figsize)
    ax.quiver(
        X[idx, 0], X[idx, 1], V[idx, 0], V[idx, 1], color=colors.rgba[idx], zorder=3, scale=1,
        **_arrow_kw(arrow_size, per_cell=True),
    )  # fmt: skip
    _draw_cells(
        ax, adata, X, colors, color, size=size, alpha=alpha, legend_loc=legend_loc, legend_fontsize=legend_fontsize,
        basis=basis, title=title,
    )  # fmt: skip
    return finish(ax, show=show, save=save, new=new, name="velocity_embedding")


def _length_factor(V: np.ndarray, length: float) -> float:
    """Factor that draws the 90th-percentile arrow of ``V`` with ``length`` (data units); relative lengths stay."""
    norms = np.sqrt((V**2).sum(1))
    norms = norms[np.isfinite(norms) & (norms > 0)]
    return float(length / np.percentile(norms, 90)) if norms.size else 1.0


def _arrow_kw(arrow_size: float, *, per_cell: bool = False) -> dict:
    """scVelo's quiver style: head length, width and axis length 12, 10, 8 x ``arrow_size`` (halved)."""
    f = arrow_size / 2
    return dict(
        angles="xy",
        scale_units="xy",
        width=0.0015 if per_cell else 0.001,
        headlength=12 * f,
        headwidth=10 * f,
        headaxislength=8 * f,
        edgecolors="face" if per_cell else "k",
        linewidth=0 if per_cell else 0.2,
    )


for _f in (velocity_embedding_stream, velocity_embedding_grid, velocity_embedding):
    _f.__doc__ = _f.__doc__.replace("    {common}\n", _COMMON_DOC.lstrip("\n"))
