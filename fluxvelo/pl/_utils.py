"""Shared plotting helpers: axes and show/save handling, cell colours, legends, key checks."""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import is_color_like, to_hex
from matplotlib.lines import Line2D

from .._utils import to_dense

_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}
NA_COLOR = "lightgray"


def get_ax(ax: Axes | None, figsize: tuple[float, float] | None = None) -> tuple[Axes, bool]:
    """The given Axes, or a new figure's; the flag says whether it is new."""
    if ax is not None:
        return ax, False
    _, ax = plt.subplots(figsize=figsize)
    return ax, True


def finish(ax: Axes, *, show: bool | None, save: str | os.PathLike | bool | None, new: bool, name: str) -> Axes:
    """Save and/or show the figure of ``ax``; return ``ax``.

    ``show=None`` shows only a figure made here, under interactive mode, with an interactive backend (or
    inline in Jupyter). ``save=True`` writes ``fluxvelo_<name>.png`` in the working directory.
    """
    if save:
        path = f"fluxvelo_{name}.png" if save is True else os.fspath(save)
        ax.figure.savefig(path, dpi=150, bbox_inches="tight")
    if show is None:
        backend = mpl.get_backend().lower()
        show = new and plt.isinteractive() and backend not in _NON_INTERACTIVE
    if show:
        plt.show()
    return ax


def check_adata(adata, func: str) -> None:
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func} expects an AnnData, got {type(adata).__name__}.")


def basis_name(basis: str) -> str:
    return basis[2:] if basis.startswith("X_") else basis


def embedding_coords(adata: AnnData, basis: str) -> np.ndarray:
    """``obsm['X_<basis>']`` (first two columns) or an error naming the tool that computes it."""
    name = basis_name(basis)
    key = f"X_{name}"
    if key not in adata.obsm:
        raise KeyError(
            f"Embedding '{key}' not found; adata.obsm has {list(adata.obsm.keys())}. Compute it first "
            f"(e.g. scanpy.tl.{name}(adata)) or pass another basis."
        )
    X = np.asarray(adata.obsm[key], dtype=np.float64)
    if X.ndim != 2 or X.shape[1] < 2:
        raise ValueError(f"obsm['{key}'] must have at least 2 columns, got shape {X.shape}.")
    return X[:, :2]


def embedding_velocity(adata: AnnData, basis: str, vkey: str) -> np.ndarray:
    """``obsm['<vkey>_<basis>']`` or an error naming :func:`fluxvelo.tl.velocity_embedding`."""
    name = basis_name(basis)
    key = f"{vkey}_{name}"
    if key not in adata.obsm:
        hint = (
            f"Run fv.tl.velocity_graph(adata, vkey='{vkey}') and fv.tl.velocity_embedding(adata, basis='{name}', "
            f"vkey='{vkey}') first."
        )
        if vkey not in adata.layers:
            hint = f"adata.layers has no '{vkey}' either: run fv.tl.velocity(adata) first, then " + hint[4:]
        raise KeyError(f"adata.obsm has no '{key}' (projected velocities). {hint}")
    V = np.asarray(adata.obsm[key], dtype=np.float64)
    if V.shape[0] != adata.n_obs or V.ndim != 2 or V.shape[1] < 2:
        raise ValueError(f"obsm['{key}'] has shape {V.shape}; expected ({adata.n_obs}, >=2).")
    return V[:, :2]


def default_palette(n: int) -> list[str]:
    """scanpy's default categorical colours for ``n`` categories."""
    from scanpy.plotting import palettes

    cycle = mpl.rcParams["axes.prop_cycle"].by_key().get("color", [])
    if len(cycle) >= n:
        return [to_hex(c) for c in cycle[:n]]
    for pal in (palettes.default_20, palettes.default_28, palettes.default_102):
        if len(pal) >= n:
            return list(pal[:n])
    return ["grey"] * n


def _categories(values: pd.Series) -> pd.Categorical:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return pd.Categorical(values)
    return pd.Categorical(values.astype(str) if values.dtype == bool else values)


def category_colors(adata: AnnData, key: str, palette=None) -> dict[str, str]:
    """Colour per category of ``obs[key]``: ``palette``, else ``uns['<key>_colors']``, else scanpy's defaults."""
    cats = [str(c) for c in _categories(adata.obs[key]).categories]
    if palette is not None:
        if isinstance(palette, Mapping):
            missing = [c for c in cats if c not in palette]
            if missing:
                raise ValueError(f"palette has no colour for the categories {missing} of obs['{key}'].")
            return {c: palette[c] for c in cats}
        if isinstance(palette, str):
            cmap = mpl.colormaps[palette]
            return {c: to_hex(cmap(i / max(len(cats) - 1, 1))) for i, c in enumerate(cats)}
        palette = list(palette)
        if len(palette) < len(cats):
            raise ValueError(f"palette has {len(palette)} colours but obs['{key}'] has {len(cats)} categories.")
        return dict(zip(cats, palette))
    stored = adata.uns.get(f"{key}_colors")
    if stored is not None and len(stored) >= len(cats) and all(is_color_like(c) for c in stored):
        return dict(zip(cats, list(stored)))
    return dict(zip(cats, default_palette(len(cats))))


class CellColors:
    """How cells are coloured: per-cell RGBA plus what the legend needs."""

    def __init__(self, rgba, categories=None, values=None, cmap=None, norm=None):
        self.rgba = rgba
        self.categories = categories  # dict name -> colour, for a categorical key
        self.values = values  # numeric values, for a continuous key
        self.cmap, self.norm = cmap, norm


def cell_colors(adata: AnnData, color, *, palette=None, cmap: str = "viridis", layer: str | None = None) -> CellColors:
    """Resolve ``color`` (obs column, gene name, a matplotlib colour or None) into per-cell colours."""
    n = adata.n_obs
    if color is None:
        return CellColors(np.tile(mpl.colors.to_rgba(NA_COLOR), (n, 1)))
    if isinstance(color, str) and color in adata.obs:
        values = adata.obs[color]
        if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values) or (
            values.dtype == bool
        ):
            cat = _categories(values)
            colors = category_colors(adata, color, palette)
            table = np.array([mpl.colors.to_rgba(colors[str(c)]) for c in cat.categories]).reshape(-1, 4)
            rgba = np.where(
                (cat.codes >= 0)[:, None], table[np.maximum(cat.codes, 0)], mpl.colors.to_rgba(NA_COLOR)
            )
            return CellColors(rgba, categories=colors)
        return _continuous(np.asarray(values, dtype=np.float64), cmap)
    if isinstance(color, str) and color in adata.var_names:
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"adata.layers has no '{layer}'; it has {list(adata.layers.keys())}.")
        X = adata.layers[layer] if layer is not None else adata.X
        return _continuous(to_dense(X[:, adata.var_names.get_loc(color)]).ravel().astype(np.float64), cmap)
    if isinstance(color, str) and is_color_like(color):
        return CellColors(np.tile(mpl.colors.to_rgba(color), (n, 1)))
    raise KeyError(
        f"color={color!r} is neither a column of adata.obs ({list(adata.obs.columns)[:10]}...) nor a gene name; "
        "pass color=None for grey cells."
    )


def _continuous(values: np.ndarray, cmap: str) -> CellColors:
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    norm = mpl.colors.Normalize(lo, hi if hi > lo else lo + 1)
    cm = mpl.colormaps[cmap]
    rgba = np.where(np.isfinite(values)[:, None], cm(norm(np.nan_to_num(values))), mpl.colors.to_rgba(NA_COLOR))
    return CellColors(rgba, values=values, cmap=cm, norm=norm)


def default_size(n_obs: int) -> float:
    """scanpy's point size ``120000 / n_obs``, capped for small data."""
    return float(min(120_000 / max(n_obs, 1), 100.0))


def scatter_cells(ax: Axes, X: np.ndarray, colors: CellColors, *, size, alpha, zorder=0, rasterized=None):
    """Scatter cells in a random but fixed order, so that no category hides another."""
    order = np.random.default_rng(0).permutation(len(X))
    if colors.values is not None:  # continuous: high values on top
        order = np.argsort(np.nan_to_num(colors.values, nan=-np.inf), kind="stable")
    return ax.scatter(
        X[order, 0],
        X[order, 1],
        c=colors.rgba[order],
        s=size,
        alpha=alpha,
        linewidths=0,
        zorder=zorder,
        rasterized=len(X) > 5000 if rasterized is None else rasterized,
        plotnonfinite=True,
    )


def add_legend(ax: Axes, X: np.ndarray, adata: AnnData, color, colors: CellColors, legend_loc, fontsize=None):
    """Category legend ('on data', 'right margin', any matplotlib location, or None) or a colourbar."""
    if colors.values is not None:
        sm = mpl.cm.ScalarMappable(norm=colors.norm, cmap=colors.cmap)
        ax.figure.colorbar(sm, ax=ax, shrink=0.6, pad=0.02, label=str(color))
        return
    if colors.categories is None or legend_loc in (None, "none", False):
        return
    if legend_loc == "on data":
        labels = _categories(adata.obs[color])
        for code, name in enumerate(labels.categories):
            pts = X[labels.codes == code]
            if len(pts):
                x, y = np.median(pts, axis=0)
                ax.text(x, y, str(name), ha="center", va="center", fontweight="bold", fontsize=fontsize, zorder=5)
        return
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor=c, markeredgewidth=0, label=name)
        for name, c in colors.categories.items()
    ]
    if legend_loc == "right margin":
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=fontsize)
    else:
        ax.legend(handles=handles, loc=legend_loc, frameon=False, fontsize=fontsize)


def clean_embedding_axes(ax: Axes, basis: str, title) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    name = basis_name(basis).upper() if basis_name(basis) in {"umap", "pca", "tsne"} else basis_name(basis)
    ax.set_xlabel(f"{name}1")
    ax.set_ylabel(f"{name}2")
    if title:
        ax.set_title(title)
