"""Plots of results: per-edge cross-boundary correctness across methods, and the training loss."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from .. import _keys as keys
from ._utils import check_adata, default_palette, finish, get_ax

__all__ = ["cbc_bars", "loss_curve"]


def _edge_values(method: str, value) -> tuple[pd.Series, float | None]:
    """Per-edge CBC of one method as a Series edge -> value, and its pooled score when given."""
    pooled = None
    if isinstance(value, tuple) and len(value) == 2 and np.isscalar(value[0]):  # cross_boundary_correctness output
        pooled, value = float(value[0]), value[1]
    if isinstance(value, pd.DataFrame):
        if "cbc" not in value.columns:
            raise ValueError(f"The table of method {method!r} has no 'cbc' column (columns: {list(value.columns)}).")
        index = value["edge"] if "edge" in value.columns else value.index
        value = pd.Series(value["cbc"].to_numpy(), index=index)
    elif isinstance(value, Mapping):
        value = pd.Series(dict(value), dtype=np.float64)
    elif not isinstance(value, pd.Series):
        raise TypeError(
            f"CBC results of method {method!r} must be a dict or Series edge -> value, a DataFrame with a 'cbc' "
            f"column, or the (pooled, per_edge) pair of fv.metrics.cross_boundary_correctness; got {type(value).__name__}."
        )
    value.index = [_edge_label(e) for e in value.index]
    return value.astype(np.float64), pooled


def _edge_label(edge) -> str:
    if isinstance(edge, tuple) and len(edge) == 2:
        return f"{edge[0]} -> {edge[1]}"
    return str(edge)


def _tidy(results) -> tuple[pd.DataFrame, dict[str, float]]:
    """A table edges x methods (in order of first appearance) and the pooled scores given with it."""
    pooled = {}
    if isinstance(results, pd.DataFrame):
        missing = {"method", "edge", "cbc"} - set(results.columns)
        if missing:
            raise ValueError(
                f"A CBC table needs the columns 'method', 'edge', 'cbc'; missing {sorted(missing)} "
                f"(columns: {list(results.columns)})."
            )
        results = {
            m: pd.Series(g["cbc"].to_numpy(), index=g["edge"].map(_edge_label))
            for m, g in results.groupby("method", sort=False)
        }
    if not isinstance(results, Mapping) or not results:
        raise TypeError(
            "results must be a non-empty dict method -> per-edge CBC (dict, Series, DataFrame or the output of "
            "fv.metrics.cross_boundary_correctness), or a DataFrame with columns method, edge, cbc."
        )
    columns = {}
    for method, value in results.items():
        series, score = _edge_values(str(method), value)
        if series.index.duplicated().any():
            raise ValueError(f"Method {method!r} has duplicated edges: {list(series.index[series.index.duplicated()])}.")
        columns[str(method)] = series
        if score is not None:
            pooled[str(method)] = score
    edges = list(dict.fromkeys(e for s in columns.values() for e in s.index))
    table = pd.DataFrame({m: s.reindex(edges) for m, s in columns.items()}, index=edges)
    return table, pooled


def cbc_bars(
    results,
    *,
    palette=None,
    width: float = 0.8,
    title: str | None = "Cross-boundary correctness",
    legend_loc: str | None = "best",
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Grouped bars of the per-edge cross-boundary correctness (CBC) of several methods.

    Parameters
    ----------
    results
        Either a dict method -> per-edge CBC, each a dict or :class:`~pandas.Series` edge -> value, a
        :class:`~pandas.DataFrame` with a ``cbc`` column (indexed by edge or with an ``edge`` column), or the
        ``(pooled, per_edge)`` pair returned by :func:`fluxvelo.metrics.cross_boundary_correctness` (its pooled
        score is then shown in the legend); or a tidy DataFrame with columns ``method``, ``edge``, ``cbc``.
        Edges may be strings ``'A -> B'`` or pairs ``(A, B)``. A method without an edge gets no bar there (NaN).
    palette
        Colours of the methods: a list or a dict method -> colour; default scanpy's palette.
    width
        Total width of a group of bars.
    title
        Axes title.
    legend_loc
        Location of the method legend, or None.
    figsize
        Size of a new figure; default grows with the number of edges.
    ax
        Axes to draw into; a new figure when None.
    show
        Call :func:`matplotlib.pyplot.show`. Default: only for a new figure in interactive mode with an
        interactive backend.
    save
        File path to save the figure to (``True``: ``fluxvelo_cbc_bars.png``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` drawn into; one bar container per method (``ax.containers``), in the
    order of ``results``, each with one bar per edge.
    """
    table, pooled = _tidy(results)
    methods = list(table.columns)
    if isinstance(palette, Mapping):
        colors = [palette[m] for m in methods]
    elif palette is not None:
        colors = list(palette)[: len(methods)]
    else:
        colors = default_palette(len(methods))
    if figsize is None and ax is None:
        figsize = (max(4.0, 0.9 * len(table) * max(1, len(methods) / 3) + 1.5), 4.0)
    ax, new = get_ax(ax, figsize)
    x = np.arange(len(table))
    step = width / len(methods)
    for i, (method, color) in enumerate(zip(methods, colors)):
        label = f"{method} ({pooled[method]:.3f})" if method in pooled else method
        ax.bar(x - width / 2 + (i + 0.5) * step, table[method].to_numpy(), step, color=color, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, table.index, rotation=30, ha="right")
    ax.set_ylabel("CBC")
    ax.set_xlim(-0.6, len(table) - 0.4)
    if title:
        ax.set_title(title)
    if legend_loc is not None:
        ax.legend(loc=legend_loc, frameon=False, title="method (pooled)" if pooled else None)
    return finish(ax, show=show, save=save, new=new, name="cbc_bars")


def loss_curve(
    adata: AnnData,
    *,
    key: str = keys.VELOCITY,
    log: bool | None = None,
    color: str = "C0",
    label: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
) -> Axes:
    """Training loss of the velocity fit per epoch, from ``uns['<key>_params']['loss_history']``.

    Parameters
    ----------
    adata
        Annotated data on which :func:`fluxvelo.tl.velocity` was run.
    key
        ``key_added`` of the fit.
    log
        Logarithmic y axis; default when all losses are positive and span more than a factor 10.
    color, label
        Line colour and legend label (a legend is drawn only with a label, e.g. to overlay several fits).
    figsize
        Size of a new figure.
    ax
        Axes to draw into; a new figure when None.
    show
        Call :func:`matplotlib.pyplot.show`. Default: only for a new figure in interactive mode with an
        interactive backend.
    save
        File path to save the figure to (``True``: ``fluxvelo_loss_curve.png``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` drawn into.
    """
    check_adata(adata, "loss_curve")
    pkey = keys.PARAMS.format(key=key)
    params = adata.uns.get(pkey)
    if not isinstance(params, Mapping):
        raise KeyError(f"adata.uns has no '{pkey}'. Run fv.tl.velocity(adata) first.")
    if "loss_history" not in params:
        raise KeyError(
            f"uns['{pkey}'] has no 'loss_history' (mode {params.get('mode')!r}): the velocity was not fitted by "
            "fluxvelo. Run fv.tl.velocity(adata) first."
        )
    loss = np.asarray(params["loss_history"], dtype=np.float64).ravel()
    if loss.size == 0:
        raise ValueError(f"uns['{pkey}']['loss_history'] is empty.")
    epochs = np.arange(1, loss.size + 1)
    ax, new = get_ax(ax, figsize)
    ax.plot(epochs, loss, color=color, marker="o" if loss.size <= 30 else None, ms=3, label=label)
    finite = loss[np.isfinite(loss)]
    if log is None:
        log = finite.size > 0 and finite.min() > 0 and finite.max() > 10 * finite.min()
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set_xlabel("epoch")
    ax.set_ylabel("Flux Matching loss")
    ax.set_title(f"Training loss ({key})")
    if label is not None:
        ax.legend(frameon=False)
    return finish(ax, show=show, save=save, new=new, name="loss_curve")
