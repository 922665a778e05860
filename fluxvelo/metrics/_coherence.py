"""In-cluster coherence (VeloAE): velocity agreement with kNN neighbours of the same cluster."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from ._checks import clusters, knn_graph, unit_rows, velocities


def in_cluster_coherence(
    adata: AnnData,
    *,
    cluster_key: str,
    vkey: str = _keys.VELOCITY,
    use_velocity_genes: bool = False,
    center: bool = False,
) -> tuple[float, pd.Series]:
    r"""Mean cosine similarity of each cell's velocity with its same-cluster kNN neighbours'.

    Per cell :math:`h_i = \frac{1}{|S(i)|}\sum_{j\in S(i)} \cos(v_i, v_j)`, :math:`S(i)` the neighbours of
    :math:`i` in ``obsp['distances']`` that share its cluster; cells with no such neighbour are skipped. Each
    cluster's score is the mean over its cells, and the result the mean over clusters (VeloAE). A cluster none
    of whose cells has a same-cluster neighbour (e.g. a single cell) gets NaN, with a warning, and is left out.
    Genes as in :func:`consistency` (default: all genes without NaN, uncentred); zero velocities count as 0.

    Parameters
    ----------
    adata
        Annotated data with ``obs[cluster_key]``, ``layers[vkey]`` and ``obsp['distances']``.
    cluster_key
        obs column with the cluster labels.
    vkey
        Velocity layer.
    use_velocity_genes
        Restrict to ``var['<vkey>_genes']``.
    center
        Subtract each cell's mean over genes first.

    Returns
    -------
    mean
        Mean over clusters.
    per_cluster
        :class:`~pandas.Series` of per-cluster scores, indexed by cluster name.
    """
    labels = clusters(adata, cluster_key)
    graph = knn_graph(adata).tocoo()
    U = unit_rows(velocities(adata, vkey, use_velocity_genes, center))
    codes = labels.codes
    same = (codes[graph.row] == codes[graph.col]) & (codes[graph.row] >= 0)
    n = adata.n_obs
    same_graph = sp.csr_matrix((np.ones(int(same.sum())), (graph.row[same], graph.col[same])), shape=(n, n))
    counts = np.diff(same_graph.indptr)
    per_cell = np.einsum("ij,ij->i", U, same_graph @ U)
    scored = counts > 0
    per_cell = np.divide(per_cell, counts, out=np.full(n, np.nan), where=scored)
    per_cluster = {}
    for code, name in enumerate(labels.categories):
        cells = scored & (codes == code)
        per_cluster[name] = per_cell[cells].mean() if cells.any() else np.nan
    per_cluster = pd.Series(per_cluster, name="in_cluster_coherence", dtype=float)
    empty = per_cluster.index[per_cluster.isna()].tolist()
    if len(empty) == len(per_cluster):
        raise ValueError(f"No cell has a kNN neighbour of its own cluster in obs['{cluster_key}'].")
    if empty:
        warnings.warn(
            f"Cluster(s) {empty} have no cell with a same-cluster kNN neighbour; left out of the mean.", stacklevel=2
        )
    return float(per_cluster.mean()), per_cluster
