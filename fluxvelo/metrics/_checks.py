"""Input validation shared by the metrics: kNN graph, velocities, clusters, embeddings."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from .._lazy import in_memory


def knn_graph(adata: AnnData) -> sp.csr_matrix:
    """obsp['distances'] as a csr pattern (stored entries, self excluded), one row per cell."""
    if _keys.DISTANCES not in adata.obsp:
        raise KeyError(
            f"The metrics use the kNN graph obsp['{_keys.DISTANCES}'], but adata.obsp has "
            f"{list(adata.obsp.keys())}. Run fv.pp.moments or scanpy.pp.neighbors first."
        )
    graph = sp.csr_matrix(in_memory(adata.obsp[_keys.DISTANCES]), copy=True)
    if graph.shape != (adata.n_obs, adata.n_obs):
        raise ValueError(f"obsp['{_keys.DISTANCES}'] has shape {graph.shape}, expected ({adata.n_obs}, {adata.n_obs}).")
    graph.sum_duplicates()
    rows = np.repeat(np.arange(graph.shape[0]), np.diff(graph.indptr))
    off_diagonal = rows != graph.indices  # stored zeros (duplicate cells) stay neighbours; self does not
    indptr = np.concatenate([[0], np.cumsum(off_diagonal)])[graph.indptr]
    graph = sp.csr_matrix(
        (np.ones(int(off_diagonal.sum())), graph.indices[off_diagonal], indptr), shape=graph.shape
    )
    return graph


def velocities(adata: AnnData, vkey: str, use_velocity_genes: bool, center: bool) -> np.ndarray:
    """Dense float64 velocities over the genes without NaN (and only velocity genes when asked)."""
    if vkey not in adata.layers:
        raise KeyError(
            f"adata.layers has no '{vkey}' (it has {list(adata.layers.keys())}). "
            "Run fv.tl.velocity first or pass the right vkey."
        )
    V = adata.layers[vkey]
    V = np.asarray(V.toarray() if sp.issparse(V) else V, dtype=np.float64)
    genes = np.isfinite(V).all(0)
    n_nan = int((~genes).sum())
    if use_velocity_genes:
        gkey = _keys.VELOCITY_GENES.format(key=vkey)
        if gkey in adata.var:
            genes &= np.asarray(adata.var[gkey], dtype=bool)
        if "spearmans_score" in adata.var:  # as scVelo's velocity_confidence
            genes &= np.asarray(adata.var["spearmans_score"]) > 0.1
    if not genes.any():
        raise ValueError(
            f"No genes left in layers['{vkey}']: {n_nan} of {adata.n_vars} genes have NaN/inf velocity"
            + (" and the rest are not velocity genes." if use_velocity_genes else ".")
        )
    V = V[:, genes]
    if center:
        V = V - V.mean(1, keepdims=True)
    return V


def unit_rows(V: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero (their cosines count as 0)."""
    norm = np.sqrt(np.einsum("ij,ij->i", V, V))
    return np.divide(V, norm[:, None], out=np.zeros_like(V), where=norm[:, None] > 0)


def clusters(adata: AnnData, cluster_key: str) -> pd.Categorical:
    if cluster_key not in adata.obs:
        raise KeyError(f"adata.obs has no column '{cluster_key}'; it has {list(adata.obs.columns)}.")
    labels = pd.Categorical(adata.obs[cluster_key].values).remove_unused_categories()
    names = [str(c) for c in labels.categories]
    if len(set(names)) == len(names):
        labels = labels.rename_categories(names)
    return labels  # missing labels have code -1


def check_names(names: Iterable[str], labels: pd.Categorical, cluster_key: str) -> None:
    unknown = sorted({str(n) for n in names} - set(labels.categories))
    if unknown:
        raise ValueError(
            f"Unknown cluster name(s) {unknown} in obs['{cluster_key}']; it has {list(labels.categories)}."
        )


def embedding(adata: AnnData, basis: str, vkey: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Positions obsm['X_<basis>'] and projected velocities obsm['<vkey>_<basis>'], validated."""
    name = basis[2:] if basis.startswith("X_") else basis
    xkey, vkey_emb = f"X_{name}", _keys.EMBEDDING.format(key=vkey, basis=name)
    if xkey not in adata.obsm:
        raise KeyError(
            f"Embedding '{xkey}' not found; adata.obsm has {list(adata.obsm.keys())}. "
            f"Compute it (e.g. scanpy.tl.{name}) or pass another basis."
        )
    if vkey_emb not in adata.obsm:
        raise KeyError(
            f"Projected velocities '{vkey_emb}' not found; adata.obsm has {list(adata.obsm.keys())}. "
            f"Run fv.tl.velocity_graph(adata, vkey='{vkey}') and fv.tl.velocity_embedding(adata, basis='{name}')."
        )
    X = np.asarray(adata.obsm[xkey], dtype=np.float64)
    V = np.asarray(adata.obsm[vkey_emb], dtype=np.float64)
    if X.ndim != 2 or V.shape != X.shape:
        raise ValueError(f"obsm['{xkey}'] {X.shape} and obsm['{vkey_emb}'] {V.shape} must be 2-D of the same shape.")
    for key, arr in ((xkey, X), (vkey_emb, V)):
        bad = ~np.isfinite(arr).all(1)
        if bad.any():
            raise ValueError(
                f"obsm['{key}'] has NaN/inf in {int(bad.sum())} cell(s) (e.g. {adata.obs_names[bad][:3].tolist()}); "
                "recompute it or drop those cells."
            )
    return X, V, name
