"""Phase portrait of one gene: cells in the (s, u) plane with the fitted kinetic field and its nullclines."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from .. import _keys as keys
from .._utils import to_dense
from ..tl import vector_field
from ._utils import add_legend, cell_colors, check_adata, default_size, finish, get_ax, scatter_cells

__all__ = ["phase_portrait"]


def phase_portrait(
    adata: AnnData,
    gene: str,
    *,
    key: str = keys.VELOCITY,
    color: str | None = "clusters",
    field: bool = True,
    nullclines: bool = True,
    n_grid: int = 30,
    field_density: float = 1.0,
    field_color: str = "0.35",
    layer_spliced: str | None = None,
    layer_unspliced: str | None = None,
    palette=None,
    cmap: str = "viridis",
    size: float | None = None,
    alpha: float = 0.7,
    legend_loc: str | None = "right margin",
    legend_fontsize: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Cells of one gene in the (spliced, unspliced) plane with the fitted field's streamlines and nullclines.

    As scVelo's phase portraits, ``x`` is the smoothed spliced abundance (``Ms``) and ``y`` the smoothed
    unspliced abundance (``Mu``). The field comes from :func:`fluxvelo.tl.vector_field`: streamlines of
    ``(ds/dt, du/dt)``, the ``du/dt = 0`` nullcline (transcription drive equals splicing; solid) and the
    ``ds/dt = 0`` nullcline (splicing equals degradation, the steady-state line ``u = gamma' / beta' s``; dashed).

    Parameters
    ----------
    adata
        Annotated data on which :func:`fluxvelo.tl.velocity` was run (with ``field=False`` and
        ``nullclines=False``, any data with the two layers).
    gene
        Gene name.
    key
        ``key_added`` of the velocity fit.
    color
        obs column (categorical: colours from ``uns['<color>_colors']`` when present), a gene name, a matplotlib
        colour, or None.
    field
        Draw the streamlines of the fitted field.
    nullclines
        Draw the two nullclines.
    n_grid
        Grid points per axis for the field (see :func:`fluxvelo.tl.vector_field`).
    field_density
        ``streamplot`` density of the field's streamlines.
    field_color
        Colour of streamlines and nullclines.
    layer_spliced, layer_unspliced
        Layers for ``x`` and ``y``; default the layers the fit used (``Ms``, ``Mu``).
    palette, cmap
        Category colours (list, dict or colour-map name), colour map for a continuous ``color``.
    size
        Point size; default ``120000 / n_obs`` (capped at 100).
    alpha
        Opacity of the cells.
    legend_loc
        Location of the category legend: ``'right margin'``, ``'on data'``, a matplotlib location, or None.
    legend_fontsize
        Font size of the legends.
    title
        Axes title; default the gene name.
    figsize
        Size of a new figure.
    ax
        Axes to draw into; a new figure when None.
    show
        Call :func:`matplotlib.pyplot.show`. Default: only for a new figure in interactive mode with an
        interactive backend.
    save
        File path to save the figure to (``True``: ``fluxvelo_phase_portrait.png``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` drawn into.
    """
    check_adata(adata, "phase_portrait")
    params = adata.uns.get(keys.PARAMS.format(key=key))
    params = params if isinstance(params, Mapping) else {}
    layer_s = layer_spliced or params.get("layer_spliced", keys.MS)
    layer_u = layer_unspliced or params.get("layer_unspliced", keys.MU)
    absent = [lay for lay in (layer_s, layer_u) if lay not in adata.layers]
    if absent:
        raise KeyError(f"adata.layers has no {absent}. Run fv.pp.moments(adata) first.")
    vf = vector_field(adata, gene, key=key, n_grid=n_grid) if field or nullclines else None
    if gene not in adata.var_names:  # vector_field did not run
        raise KeyError(f"Gene {gene!r} is not in adata.var_names.")
    col = adata.var_names.get_loc(gene)
    X = np.column_stack(
        [to_dense(adata.layers[layer_s][:, col]).ravel(), to_dense(adata.layers[layer_u][:, col]).ravel()]
    ).astype(np.float64)
    colors = cell_colors(adata, color, palette=palette, cmap=cmap)

    ax, new = get_ax(ax, figsize)
    scatter_cells(ax, X, colors, size=default_size(adata.n_obs) if size is None else size, alpha=alpha, zorder=1)
    handles = []
    if vf is not None and field:
        ax.streamplot(
            vf.s, vf.u, vf.ds, vf.du, density=field_density, color=field_color, linewidth=0.6, arrowsize=0.8, zorder=2
        )
    if vf is not None and nullclines:
        # a nullcline outside the plotted window has no points: it gets no legend entry either
        du_parts = [pts for pts in vf.nullcline_du if len(pts) > 1]
        for pts in du_parts:
            ax.plot(pts[:, 0], pts[:, 1], color="k", lw=2, zorder=4, gid="nullcline_du")
        if du_parts:
            handles.append(Line2D([], [], color="k", lw=2, label="du/dt = 0"))
        if len(vf.nullcline_ds) > 1:
            ax.plot(*vf.nullcline_ds.T, color="k", lw=2, ls="--", zorder=4, gid="nullcline_ds")
            handles.append(Line2D([], [], color="k", lw=2, ls="--", label="ds/dt = 0"))
    if vf is not None:
        ax.set_xlim(vf.s[0], vf.s[-1])
        ax.set_ylim(vf.u[0], vf.u[-1])
    ax.set_xlabel(f"spliced ({layer_s})")
    ax.set_ylabel(f"unspliced ({layer_u})")
    ax.set_title(str(gene) if title is None else title)
    if handles:
        ax.add_artist(ax.legend(handles=handles, loc="upper left", framealpha=0.8, fontsize=legend_fontsize))
    add_legend(ax, X, adata, color, colors, legend_loc, legend_fontsize)
    return finish(ax, show=show, save=save, new=new, name="phase_portrait")
