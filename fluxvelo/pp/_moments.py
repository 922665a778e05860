"""kNN-smoothed first moments ``Ms``/``Mu`` with scVelo's semantics (``scv.pp.moments``)."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._jit import compile_fit_kernels_ahead
from .._keys import CONNECTIVITIES, DISTANCES, MS, MU, NEIGHBORS, SPLICED, UNSPLICED
from .._lazy import SPAN_BYTES, any_lazy, gene_block_size, in_memory, is_lazy, release_memory
from .._locality import Smoother
from .._utils import save_many
from ._anndata import view_to_actual
from ._checks import check_counts
from ._filter import looks_raw, normalize_layers, row_sums

logger = logging.getLogger("fluxvelo")

_METHODS = ("umap", "gauss")


def graph_n_neighbors(adata: AnnData) -> int:
    """``n_neighbors`` the stored graph was built with (0 when there is none)."""
    return int(adata.uns.get(NEIGHBORS, {}).get("params", {}).get("n_neighbors", 0))


def _graph(adata: AnnData, mode: str) -> Any | None:
    key = adata.uns.get(NEIGHBORS, {}).get(f"{mode}_key", mode)
    return in_memory(adata.obsp[key]) if key in adata.obsp else None


def _keep_top(graph: Any, k: int, *, largest: bool) -> sparse.csr_matrix:
    """Per row keep the ``k`` largest (or smallest) positive entries; ``k`` is capped by the sparsest row."""
    g = sparse.csr_matrix(graph, copy=True)
    g.data[g.data <= 0] = 0
    g.eliminate_zeros()
    lengths = np.diff(g.indptr)
    k = int(min(lengths.min(), k))
    rows = np.repeat(np.arange(g.shape[0]), lengths)
    order = np.lexsort((-g.data if largest else g.data, rows))  # by row, then by value; stable on ties
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - g.indptr[rows[order]]
    keep = rank < k
    return sparse.csr_matrix((g.data[keep], (rows[keep], g.indices[keep])), shape=g.shape)


def smoothing_matrix(
    graph: Any, *, n_neighbors: int | None = None, graph_neighbors: int = 0, mode: str = CONNECTIVITIES
) -> sparse.csr_matrix:
    """Row-normalised kNN averaging operator: each cell and its graph neighbours, equally weighted.

    As scVelo's ``get_connectivities``: when ``n_neighbors`` is smaller than the graph's, each row keeps its
    ``n_neighbors`` strongest connectivities (or shortest distances for ``mode='distances'``); the pattern
    of positive entries plus the diagonal is then weighted ``1 / row count`` (float32).
    """
    if n_neighbors is not None and n_neighbors < graph_neighbors:
        graph = _keep_top(graph, n_neighbors, largest=mode == CONNECTIVITIES)
    n = graph.shape[0]
    pattern = sparse.csr_matrix(sparse.csr_matrix(graph) > 0, dtype=np.int8) + sparse.identity(n, np.int8, "csr")
    pattern.sum_duplicates()
    pattern.sort_indices()
    counts = np.diff(pattern.indptr)
    weights = np.repeat((1.0 / counts).astype(np.float32), counts)
    return sparse.csr_matrix((weights, pattern.indices, pattern.indptr), shape=(n, n))


def smooth(weights: sparse.csr_matrix | Smoother, x: Any) -> Any:
    """``weights @ x`` as a dense float32 array (``x`` dense or sparse).

    ``weights`` may come as a :class:`~fluxvelo._locality.Smoother` already, so that several layers share one
    renumbering of the cells (above 32,768 cells the product runs on cells renumbered so that neighbours sit
    close in memory; the result is the same to the bit).

    A lazy (Dask) ``x`` gives a lazy result, computed in blocks of genes that span every cell (the averaging
    mixes cells, never genes); ``weights`` enters the task graph once. The blocks are at least as wide as the
    store's chunks of columns where those fit in :data:`~fluxvelo._lazy.SPAN_BYTES` (input and output): the
    product gathers each neighbour's row, and narrow rows cost more per gene (at a million cells, 98 ms per
    gene in blocks of 33 genes, 69 ms in blocks of 128).
    """
    smoother = weights if isinstance(weights, Smoother) else Smoother(weights)
    if is_lazy(x):
        import dask
        import dask.array as da

        x = da.asarray(x)
        width = gene_block_size(x.shape[0], n_arrays=2)
        stored = max(x.chunks[1], default=width)
        if width < stored <= SPAN_BYTES // (8 * x.shape[0]):
            width = stored
        x = x.rechunk({0: -1, 1: width})
        shared = dask.delayed(smoother, name=f"fluxvelo-smoothing-{uuid.uuid4().hex}", traverse=False)
        return x.map_blocks(_smooth_block, shared, dtype=np.float32, meta=np.empty((0, 0), np.float32))
    return _smooth_block(x, smoother)


def _smooth_block(x: Any, smoother: Smoother) -> np.ndarray:
    return smoother(sparse.csr_matrix(x) if sparse.issparse(x) else np.asarray(x)).astype(np.float32, copy=False)


def _representation(adata: AnnData, use_rep: str | None, n_pcs: int | None) -> str:
    if use_rep is None:
        return "X" if adata.n_vars < 50 or n_pcs == 0 else "X_pca"
    if use_rep not in adata.obsm and f"X_{use_rep}" in adata.obsm:
        return f"X_{use_rep}"
    return use_rep


def scanpy_neighbors(adata: AnnData, **kwargs: Any) -> None:
    """``scanpy.pp.neighbors(adata, **kwargs)``, with a clear error where the kNN package is incompatible.

    Above 8,192 cells scanpy switches to pynndescent's approximate search. pynndescent 0.7 hands scanpy 1.11
    a ``csr_array``, on which scanpy calls ``getnnz``; the error then names the fix instead of scanpy's line.
    """
    import scanpy as sc

    try:
        sc.pp.neighbors(adata, **kwargs)
        release_memory()  # the approximate search leaves much freed heap behind
    except AttributeError as err:
        if "getnnz" not in str(err):
            raise
        import pynndescent

        raise ImportError(
            f"scanpy's approximate neighbour search (used above 8,192 cells) fails with pynndescent "
            f"{pynndescent.__version__}: it returns a sparse array where scanpy expects a sparse matrix. "
            "Install 'pynndescent<0.7' (pip install 'pynndescent<0.7'), as fluxvelo's requirements ask."
        ) from err


def compute_neighbors(
    adata: AnnData,
    x: Any,
    *,
    n_neighbors: int,
    n_pcs: int | None,
    use_rep: str | None,
    method: str,
    random_state: int | None,
) -> list[tuple[str, str, Any]]:
    """scanpy's neighbour graph of ``adata`` (``x`` stands for its X), as (attr, key, value) writes.

    PCA is computed first when the representation is 'X_pca' and it is absent or has fewer than
    ``n_pcs`` components (scVelo's rule: arpack, highly variable genes when marked).
    """
    import scanpy as sc

    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {_METHODS}.")
    rep = _representation(adata, use_rep, n_pcs)
    if is_lazy(x):  # scanpy's Dask PCA reads blocks of whole cells
        x = x.rechunk({1: -1})
    tmp = AnnData(X=x, obs=adata.obs[[]], var=adata.var[[]])
    writes: list[tuple[str, str, Any]] = []
    if rep == "X_pca":
        pcs = adata.obsm.get("X_pca")
        if pcs is None or (n_pcs is not None and n_pcs > pcs.shape[1]):
            hvg = adata.var["highly_variable"].to_numpy(bool) if "highly_variable" in adata.var else None
            n_vars = int(hvg.sum()) if hvg is not None else adata.n_vars
            n_comps = min(30 if n_pcs is None else n_pcs, n_vars - 1, adata.n_obs - 1)
            logger.info("computing PCA with %d components", n_comps)
            # scanpy's exact PCA for Dask arrays (one pass for the covariance); arpack in memory, as scVelo
            solver = "covariance_eigh" if is_lazy(x) else "arpack"
            sc.pp.pca(tmp, n_comps=n_comps, mask_var=hvg, svd_solver=solver, random_state=random_state)
            writes += [("obsm", "X_pca", tmp.obsm["X_pca"]), ("varm", "PCs", tmp.varm["PCs"]), ("uns", "pca", tmp.uns["pca"])]
        else:
            tmp.obsm["X_pca"] = pcs
        n_pcs = None if n_pcs is None else min(n_pcs, tmp.obsm["X_pca"].shape[1])
    elif rep != "X":
        if rep not in adata.obsm:
            raise KeyError(f"use_rep={use_rep!r} not found in adata.obsm; compute it first or pass use_rep=None.")
        tmp.obsm[rep] = adata.obsm[rep]
        n_pcs = None if n_pcs is None else min(n_pcs, tmp.obsm[rep].shape[1])
    logger.info("computing neighbors (n_neighbors=%d, use_rep=%r)", n_neighbors, rep)
    scanpy_neighbors(tmp, n_neighbors=n_neighbors, n_pcs=n_pcs, use_rep=rep, method=method, random_state=random_state)
    writes += [
        ("obsp", DISTANCES, tmp.obsp[DISTANCES]),
        ("obsp", CONNECTIVITIES, tmp.obsp[CONNECTIVITIES]),
        ("uns", NEIGHBORS, tmp.uns[NEIGHBORS]),
    ]
    return writes


def moments(
    adata: AnnData,
    *,
    n_neighbors: int = 30,
    n_pcs: int | None = 30,
    use_rep: str | None = None,
    mode: Literal["connectivities", "distances"] = "connectivities",
    method: Literal["umap", "gauss"] = "umap",
    random_state: int | None = 0,
    copy: bool = False,
) -> AnnData | None:
    """First-order moments ``Ms``/``Mu``: spliced and unspliced averaged over each cell's kNN neighbourhood.

    Same results as ``scvelo.pp.moments``. Each cell's value is the plain mean over itself and every cell it
    is connected to in the neighbour graph. The graph is computed with scanpy when there is none or when it
    was built with fewer than ``n_neighbors`` neighbours; a graph with more neighbours is thinned to the
    ``n_neighbors`` strongest connections per cell. Layers that still look like raw counts are normalised
    per cell first, as scVelo does.

    Dask-backed layers (e.g. from a zarr store) stay lazy: ``Ms``/``Mu`` come back as Dask arrays computed in
    blocks of genes over all cells, and a new graph uses scanpy's exact Dask PCA. Lazy layers must be
    normalised already (see the scale page of the docs).

    Parameters
    ----------
    adata
        Annotated data with (normalised) ``layers['spliced']`` and ``layers['unspliced']``.
    n_neighbors
        Number of neighbours.
    n_pcs
        Principal components used for a newly computed graph.
    use_rep
        Representation for a new graph: None picks 'X_pca' (computed if absent), or 'X' below 50 genes.
    mode
        Graph whose pattern defines the neighbourhoods: 'connectivities' (scVelo's default, the symmetric
        UMAP graph) or 'distances' (each cell's own kNN list).
    method
        scanpy's connectivity kernel for a new graph: 'umap' or 'gauss'.
    random_state
        Seed of PCA and the approximate neighbour search.
    copy
        Return a modified copy instead of changing ``adata`` in place.

    Returns
    -------
    AnnData | None
        The copy if ``copy=True``, else None. Sets:

        - ``layers['Ms']``, ``layers['Mu']``: dense float32 moments of spliced / unspliced
        - ``obsp['distances']``, ``obsp['connectivities']``, ``uns['neighbors']``: only when the graph is
          (re)computed; then also ``obsm['X_pca']``, ``varm['PCs']``, ``uns['pca']`` if PCA was computed
        - ``X``, ``layers['spliced']``, ``layers['unspliced']``, ``obs['n_counts']`` (and
          ``var['gene_count_corr']`` above 3,000 genes): only when the layers were still raw counts
    """
    if mode not in (CONNECTIVITIES, DISTANCES):
        raise ValueError(f"mode={mode!r} is not supported; use 'connectivities' or 'distances'.")
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {_METHODS}.")
    check_counts(adata, [SPLICED, UNSPLICED], hint="moments smooths spliced/unspliced counts; load data that has them")
    compile_fit_kernels_ahead()  # a fit usually follows: where they are not cached, its kernels compile meanwhile
    writes: list[tuple[str, str, Any]] = []

    mats: dict[str, Any] = {}
    raw = [name for name in (SPLICED, UNSPLICED) if looks_raw(adata.layers[name])]
    if raw and any_lazy(*(adata.layers[name] for name in raw)):
        raise ValueError(
            f"Lazy (Dask) layers {raw} hold raw counts; normalise them per cell first (e.g. "
            "scanpy.pp.normalize_total(adata, layer=...) for each, which keeps them lazy), then run moments."
        )
    if raw:
        mats, var_cols, done = normalize_layers(adata, ["X", SPLICED, UNSPLICED])
        writes += [("layers", k, v) for k, v in mats.items() if k != "X"]
        if "X" in mats:
            writes.append(("X", "X", mats["X"]))
        writes += [("var", k, v) for k, v in var_cols.items()]
        writes.append(("obs", "n_counts", row_sums(mats.get("X", adata.X))))
        if done:
            logger.info("Normalized count data: %s.", ", ".join(done))

    graph_neighbors = graph_n_neighbors(adata)
    graph = _graph(adata, mode)
    if graph is None or (n_neighbors is not None and n_neighbors > graph_neighbors):
        new = compute_neighbors(
            adata,
            mats.get("X", adata.X),
            n_neighbors=n_neighbors or 30,
            n_pcs=n_pcs,
            use_rep=use_rep,
            method=method,
            random_state=random_state,
        )
        writes += new
        graph = next(v for a, k, v in new if a == "obsp" and k == mode)
        graph_neighbors = n_neighbors or 30

    logger.info("computing moments based on %s", mode)
    weights = smoothing_matrix(graph, n_neighbors=n_neighbors, graph_neighbors=graph_neighbors, mode=mode)
    smoother = Smoother(weights)
    ms = smooth(smoother, mats.get(SPLICED, adata.layers[SPLICED]))
    mu = smooth(smoother, mats.get(UNSPLICED, adata.layers[UNSPLICED]))

    out = adata.copy() if copy else adata
    view_to_actual(out)
    for attr, key, val in writes:
        if attr == "X":
            out.X = val
        else:
            save_many(out, [(attr, key, val)])
    save_many(out, [("layers", MS, ms), ("layers", MU, mu)])
    return out if copy else None
