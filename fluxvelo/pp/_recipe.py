"""The paper's preprocessing pipeline in one call."""

from __future__ import annotations

import logging
import time
from typing import Literal

from anndata import AnnData

from .._jit import compile_fit_kernels_ahead
from .._keys import NEIGHBORS, SPLICED, UNSPLICED
from ._anndata import replace_inplace
from ._checks import check_counts
from ._filter import filter_and_normalize, row_sums
from ._moments import moments, scanpy_neighbors

logger = logging.getLogger("fluxvelo")

_EMBEDDINGS = ("umap", "tsne")


def recipe_flux(
    adata: AnnData,
    *,
    min_counts: int = 1,
    min_shared_counts: int | None = 20,
    n_top_genes: int | None = 2000,
    n_pcs: int = 30,
    n_neighbors: int = 30,
    embedding: Literal["umap", "tsne"] | None = "umap",
    random_state: int | None = 0,
    copy: bool = False,
) -> AnnData | None:
    """Preprocess raw spliced/unspliced counts as in the Flux Matching paper's benchmark.

    Steps (each logged through the ``'fluxvelo'`` logger):

    1. keep cells with at least ``min_counts`` counts in X;
    2. :func:`filter_and_normalize` with ``min_shared_counts``: gene filter and per-cell normalisation of
       X, spliced and unspliced (scVelo's), then ``log1p`` of X;
    3. keep the ``n_top_genes`` highly variable genes (scanpy flavour 'seurat' on the log data);
    4. PCA with ``n_pcs`` components (arpack);
    5. scanpy neighbours on ``n_pcs`` PCs with ``n_neighbors`` neighbours;
    6. :func:`moments` (``Ms``/``Mu``);
    7. UMAP or t-SNE, only when ``obsm['X_<embedding>']`` is absent.

    Everything runs on a private copy; ``adata`` is replaced only when all steps have succeeded.

    Parameters
    ----------
    adata
        Annotated data with raw counts in X, ``layers['spliced']`` and ``layers['unspliced']``.
    min_counts
        Minimum total counts (of X) per cell.
    min_shared_counts
        Gene filter of :func:`filter_and_normalize`.
    n_top_genes
        Number of highly variable genes; None keeps all genes.
    n_pcs
        Number of principal components, for PCA and the neighbour graph.
    n_neighbors
        Number of nearest neighbours.
    embedding
        'umap', 'tsne', or None for no embedding.
    random_state
        Seed of PCA, the neighbour search and the embedding.
    copy
        Return a processed copy instead of changing ``adata`` in place.

    Returns
    -------
    AnnData | None
        The processed copy if ``copy=True``, else None. Cells and genes are subset, and it sets:

        - ``X``: normalised, log1p; ``layers['spliced']``, ``layers['unspliced']``: normalised
        - ``obs['initial_size_spliced']``, ``obs['initial_size_unspliced']``, ``obs['initial_size']``,
          ``obs['n_counts']`` and ``uns['log1p']`` (see :func:`filter_and_normalize`)
        - ``var['highly_variable']``, ``var['means']``, ``var['dispersions']``, ``var['dispersions_norm']``,
          ``uns['hvg']`` when ``n_top_genes`` is given
        - ``obsm['X_pca']``, ``varm['PCs']``, ``uns['pca']``
        - ``obsp['distances']``, ``obsp['connectivities']``, ``uns['neighbors']``
        - ``layers['Ms']``, ``layers['Mu']``
        - ``obsm['X_umap']`` and ``uns['umap']`` (or ``obsm['X_tsne']``, ``uns['tsne']``) when computed
    """
    import scanpy as sc

    if embedding is not None and embedding not in _EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r} is not supported; use 'umap', 'tsne' or None.")
    check_counts(adata, ["X", SPLICED, UNSPLICED])
    # a fit usually follows: where they are not cached, its kernels compile meanwhile on the cores left idle
    compile_fit_kernels_ahead(spare_cores=1)
    start = time.perf_counter()

    keep = row_sums(adata.X) >= min_counts
    if not keep.any():
        raise ValueError(f"No cell has at least min_counts={min_counts} counts; lower min_counts.")
    work = adata[keep].copy() if not keep.all() else adata.copy()
    logger.info("recipe_flux: kept %d of %d cells with >= %d counts", work.n_obs, adata.n_obs, min_counts)

    filter_and_normalize(work, min_shared_counts=min_shared_counts, n_top_genes=n_top_genes, log=True)
    logger.info("recipe_flux: %d genes after filtering, normalisation, log1p and HVG selection", work.n_vars)

    n_comps = min(n_pcs, work.n_obs - 1, work.n_vars - 1)
    sc.pp.pca(work, n_comps=n_comps, svd_solver="arpack", random_state=random_state)
    logger.info("recipe_flux: PCA with %d components", n_comps)

    scanpy_neighbors(work, n_neighbors=n_neighbors, n_pcs=n_comps, random_state=random_state)
    logger.info("recipe_flux: neighbours (%d nn on %d PCs)", work.uns[NEIGHBORS]["params"]["n_neighbors"], n_comps)

    moments(work, n_neighbors=n_neighbors, n_pcs=n_comps, random_state=random_state)

    if embedding is not None and f"X_{embedding}" not in work.obsm:
        if embedding == "umap":
            sc.tl.umap(work, random_state=random_state)
        else:
            sc.tl.tsne(work, n_pcs=n_comps, random_state=random_state)
        logger.info("recipe_flux: computed %s embedding", embedding)
    logger.info("recipe_flux: done in %.1f s", time.perf_counter() - start)

    if copy:
        return work
    replace_inplace(adata, work)
    return None
