"""Velocity consistency: agreement of each cell's velocity with its kNN neighbours' (scVelo's confidence)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import _keys
from .._utils import save_data
from ._checks import knn_graph, unit_rows, velocities


def consistency(
    adata: AnnData,
    *,
    vkey: str = _keys.VELOCITY,
    use_velocity_genes: bool = False,
    center: bool = False,
    clip: bool = False,
    key_added: str | None = None,
) -> float:
    r"""Mean cosine similarity of each cell's velocity with its kNN neighbours' velocities.

    Per cell :math:`c_i = \hat v_i \cdot \frac{1}{|N(i)|}\sum_{j\in N(i)} \hat v_j` with :math:`\hat v` the
    L2-normalised velocity and :math:`N(i)` the neighbours in ``obsp['distances']``; the result is the mean
    over cells (BENCHMARK.md). By default all genes without NaN are used, uncentred. With
    ``use_velocity_genes=True, center=True, clip=True`` this is scVelo's ``velocity_confidence`` (which also
    drops genes with ``var['spearmans_score'] <= 0.1`` when present). A zero velocity counts as cosine 0.

    Parameters
    ----------
    adata
        Annotated data with ``layers[vkey]`` and ``obsp['distances']``.
    vkey
        Velocity layer.
    use_velocity_genes
        Restrict to ``var['<vkey>_genes']``.
    center
        Subtract each cell's mean over genes first (Pearson correlation, as scVelo).
    clip
        Clip per-cell values at 0 before averaging (scVelo stores clipped values).
    key_added
        If given, write the per-cell values to ``adata.obs[key_added]`` (e.g. ``'velocity_confidence'``).

    Returns
    -------
    Mean over cells. When ``key_added`` is given, also sets

    ``adata.obs[key_added]``
        Per-cell consistency.
    """
    graph = knn_graph(adata)
    counts = np.diff(graph.indptr)
    if (counts == 0).any():
        bad = adata.obs_names[counts == 0][:5].tolist()
        raise ValueError(
            f"{int((counts == 0).sum())} cell(s) have no neighbours in obsp['distances'] (e.g. {bad}); "
            "recompute the kNN graph (fv.pp.moments / scanpy.pp.neighbors)."
        )
    U = unit_rows(velocities(adata, vkey, use_velocity_genes, center))
    mean_neighbour = (graph @ U) / counts[:, None]
    per_cell = np.einsum("ij,ij->i", U, mean_neighbour)
    if clip:
        per_cell = np.clip(per_cell, 0, None)
    if key_added is not None:
        save_data(adata, "obs", key_added, pd.Series(per_cell, index=adata.obs_names))
    return float(per_cell.mean())
