"""Cross-boundary direction correctness (CBC), the VeloAE definition, pooled over all edges."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import _keys
from ._checks import check_names, clusters, embedding, knn_graph

_PAIR_ELEMENTS = 1 << 22  # pairs x embedding dimensions per block


def _parse_edges(edges: Iterable[Sequence[str] | str]) -> list[tuple[str, str]]:
    out = []
    for edge in edges:
        if isinstance(edge, str):
            parts = [p.strip() for p in edge.split("->")]
        else:
            parts = [str(p) for p in edge]
        if len(parts) != 2:
            raise ValueError(f"An edge must be a pair (A, B) or a string 'A -> B', got {edge!r}.")
        if parts[0] == parts[1]:
            raise ValueError(f"Edge {edge!r} goes from a cluster to itself.")
        out.append((parts[0], parts[1]))
    if not out:
        raise ValueError("No edges given; pass e.g. edges=[('Ductal', 'Ngn3 low EP')].")
    return out


def cross_boundary_correctness(
    adata: AnnData,
    *,
    cluster_key: str,
    edges: Iterable[Sequence[str] | str],
    basis: str = "umap",
    vkey: str = _keys.VELOCITY,
) -> tuple[float, pd.DataFrame]:
    r"""Cross-boundary direction correctness: do projected velocities point from A into B?

    For each edge A -> B, every cell :math:`i` of A with at least one kNN neighbour in B
    (``obsp['distances']``) scores :math:`\frac{1}{|N_B(i)|}\sum_{j\in N_B(i)} \cos(x_j - x_i, v_i)`, with
    :math:`x` the embedding and :math:`v` the projected velocity (a zero vector gives cosine 0). The result
    is the mean over all such cells of all edges, pooled (a cell counts once per edge it borders); the
    per-edge means are returned too (VeloAE's definition, BENCHMARK.md).

    Parameters
    ----------
    adata
        Annotated data with ``obs[cluster_key]``, ``obsm['X_<basis>']``, ``obsm['<vkey>_<basis>']`` and
        ``obsp['distances']``.
    cluster_key
        obs column with the cluster labels.
    edges
        Lineage edges, as pairs ``(A, B)`` or strings ``'A -> B'``.
    basis
        Embedding, e.g. ``'umap'``.
    vkey
        Velocity key; the projection is read from ``obsm['<vkey>_<basis>']``.

    Returns
    -------
    pooled
        Mean score over all boundary cells of all edges.
    per_edge
        :class:`~pandas.DataFrame` indexed by ``'A -> B'`` with columns ``source``, ``target``, ``cbc`` (mean
        over that edge's boundary cells; NaN, with a warning, when it has none) and ``n_cells``.
    """
    edges = _parse_edges(edges)
    labels = clusters(adata, cluster_key)
    check_names([n for e in edges for n in e], labels, cluster_key)
    X, V, _ = embedding(adata, basis, vkey)
    graph = knn_graph(adata)

    n = adata.n_obs
    rows = np.repeat(np.arange(n), np.diff(graph.indptr))
    cols = graph.indices
    cos = np.zeros(rows.size)
    step = max(1, _PAIR_ELEMENTS // X.shape[1])  # pairs at a time, so that a large graph needs little memory
    for start in range(0, rows.size, step):
        r, c = rows[start : start + step], cols[start : start + step]
        dx, v = X[c] - X[r], V[r]
        den = np.sqrt(np.einsum("ij,ij->i", dx, dx) * np.einsum("ij,ij->i", v, v))
        np.divide(np.einsum("ij,ij->i", dx, v), den, out=cos[start : start + step], where=den > 0)

    codes = labels.codes
    cats = list(labels.categories)
    scores, table = [], []
    for a, b in edges:
        sel = (codes[rows] == cats.index(a)) & (codes[cols] == cats.index(b))
        count = np.bincount(rows[sel], minlength=n)
        total = np.bincount(rows[sel], weights=cos[sel], minlength=n)
        cells = count > 0
        cell_scores = total[cells] / count[cells]
        scores.append(cell_scores)
        if not cells.any():
            warnings.warn(
                f"Edge {a} -> {b}: no cell of '{a}' has a kNN neighbour in '{b}'; its CBC is NaN.", stacklevel=2
            )
        table.append((f"{a} -> {b}", a, b, cell_scores.mean() if cells.any() else np.nan, int(cells.sum())))
    pooled_scores = np.concatenate(scores)
    if pooled_scores.size == 0:
        raise ValueError(
            f"No boundary cells for any edge: no cell of a source cluster has a kNN neighbour in its target "
            f"(obs['{cluster_key}'], obsp['distances']). Check the edges and the graph."
        )
    per_edge = pd.DataFrame(table, columns=["edge", "source", "target", "cbc", "n_cells"]).set_index("edge")
    return float(pooled_scores.mean()), per_edge
