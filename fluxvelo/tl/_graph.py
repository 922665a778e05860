"""Velocity graph: cosine correlations between velocities and displacements to neighbours (scVelo's definition)."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from .._jit import HAS_NUMBA, PROJECTION_KERNELS, announce_compile, compile_in_children, projection_kernels, ready
from .._lazy import column_blocks, columns, gene_block_size, in_memory, is_lazy, release_memory
from .._locality import locality_order, renumber, restore_rows
from .._threads import cpu_threads
from .._utils import logger, save_many


__all__ = ["velocity_graph"]

_CHUNK_ELEMENTS = 1 << 17  # pairs x genes per block in the numpy path (float32 blocks that stay in cache)
_FINISH_PAIRS = 1 << 22  # pairs per block when the sums become cosines
LAZY_GRAPH_PAIRS = 1 << 25  # pairs per block of cells when the layers are lazy (about 60 bytes each at most;
# each block reads the states again, 8 GB at a million cells x 2,000 genes)


def _get_distances(adata: AnnData) -> sp.csr_matrix:
    """The kNN distance graph, from obsp (or the legacy uns['neighbors'])."""
    if _keys.DISTANCES in adata.obsp:
        dist = in_memory(adata.obsp[_keys.DISTANCES])
    elif _keys.DISTANCES in adata.uns.get(_keys.NEIGHBORS, {}):
        dist = adata.uns[_keys.NEIGHBORS][_keys.DISTANCES]
    else:
        raise KeyError(
            f"No kNN graph: adata.obsp has {list(adata.obsp.keys())}, but "
            f"'{_keys.DISTANCES}' is needed. Run fv.pp.moments or scanpy.pp.neighbors first."
        )
    return sp.csr_matrix(dist)


def knn_indices(dist: sp.spmatrix, n_neighbors: int | None = None) -> sp.csr_matrix:
    """Boolean kNN pattern with the same number ``k`` of neighbours in every row (scVelo's ``get_indices``).

    ``k`` is the smallest number of stored entries of any row (capped by ``n_neighbors``); rows with more keep
    their ``k`` nearest. Stored zeros count as neighbours.
    """
    dist = sp.csr_matrix(dist, copy=True)
    dist.sum_duplicates()
    counts = np.diff(dist.indptr)
    if counts.size == 0 or counts.min() == 0:
        bad = np.flatnonzero(counts == 0)
        raise ValueError(
            f"{bad.size} cell(s) have no neighbours in the kNN graph (e.g. cell indices {bad[:5].tolist()}); "
            "the graph looks corrupted, e.g. by subsetting. Recompute it with fv.pp.moments or scanpy.pp.neighbors."
        )
    k = int(counts.min()) if n_neighbors is None else int(min(counts.min(), n_neighbors))
    if k < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    rows = np.repeat(np.arange(dist.shape[0]), counts)
    if counts.max() > k:  # keep the k smallest distances of each row
        order = np.lexsort((dist.data, rows))
        rank = np.arange(order.size) - np.repeat(dist.indptr[:-1], counts)
        keep = np.zeros(order.size, bool)
        keep[order[rank < k]] = True
    else:
        keep = np.ones(rows.size, bool)
    pattern = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (rows[keep], dist.indices[keep])), shape=dist.shape
    )
    return pattern


def _hood_sizes(pattern: sp.csr_matrix, n_recurse: int, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """The kNN indices as a dense array, and the neighbourhood size of cells ``first`` to ``last`` (numba)."""
    knn = np.ascontiguousarray(pattern.indices.reshape(pattern.shape[0], -1), dtype=np.int64)
    counts = np.empty(last - first, np.int64)
    projection_kernels().hood(knn, n_recurse, first, counts, counts, np.empty(0, np.int64), True)
    return knn, counts


def neighbourhood(
    pattern: sp.csr_matrix, n_recurse_neighbors: int, *, use_numba: bool | None = None, rows: slice | None = None
) -> sp.csr_matrix:
    """Each cell, its neighbours and (recursively) their neighbours: the support of ``(I + A) ** n``.

    Rows hold sorted column indices; values are 1. ``rows`` (a contiguous range) limits the result to those
    cells' rows. ``use_numba`` None: whenever numba is installed.
    """
    n = pattern.shape[0]
    first, last, _ = (rows or slice(0, n)).indices(n)
    if (HAS_NUMBA if use_numba is None else use_numba) and n > 0:
        _announce()
        knn, counts = _hood_sizes(pattern, int(n_recurse_neighbors), first, last)
        indptr = np.zeros(last - first + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), np.int64)
        projection_kernels().hood(knn, int(n_recurse_neighbors), first, counts, indptr, indices, False)
        return sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(last - first, n))
    step = (sp.identity(n, dtype=np.float32, format="csr") + pattern).tocsr()
    step.data[:] = 1
    out = step[first:last]
    for _ in range(n_recurse_neighbors - 1):
        out = (out @ step).tocsr()
        out.data[:] = 1
    out.sort_indices()
    return out


def _gene_subset(adata, vkey, gene_subset) -> np.ndarray:
    """The boolean mask of the genes to correlate over (before genes with non-finite velocities are dropped)."""
    if gene_subset is None:
        key = _keys.VELOCITY_GENES.format(key=vkey)
        return np.array(adata.var[key].values, dtype=bool) if key in adata.var else np.ones(adata.n_vars, bool)
    gene_subset = np.asarray(gene_subset)
    if gene_subset.dtype == bool:
        if gene_subset.shape != (adata.n_vars,):
            raise ValueError(f"A boolean gene_subset needs length n_vars={adata.n_vars}, got {gene_subset.shape}.")
        return gene_subset.copy()
    subset = np.asarray(adata.var_names.isin(gene_subset))
    if not subset.any():
        raise ValueError(f"None of gene_subset ({gene_subset[:5].tolist()} ...) is in adata.var_names.")
    return subset


def _signed_sqrt(V: np.ndarray) -> np.ndarray:
    return np.sqrt(np.abs(V)) * np.sign(V)


class _States:
    """The used genes' states X (every cell) and prepared velocities V, as scVelo's VelocityGraph prepares
    them: V variance-stabilised when ``sqrt_transform`` and centred over genes in each cell.

    :meth:`blocks` gives ``(X, V[rows])`` in blocks of genes: one block holding every gene for in-memory layers
    (prepared once), or, for lazy layers, blocks of genes read from them, so that no dense cells x genes matrix
    is ever held. The correlations' sums over genes add up over the blocks.
    """

    def __init__(self, adata, vkey, xkey, genes, sqrt_transform, approx):
        self.sqrt_transform = sqrt_transform
        self.order = None  # see renumber
        self.lazy = (is_lazy(adata.layers[vkey]) or is_lazy(adata.layers[xkey])) and approx is not True
        if self.lazy:
            self.x_layer, self.v_layer = adata.layers[xkey], adata.layers[vkey]
            self.genes, self.v_mean = self._velocity_genes_and_means(genes)
            self.n_genes = self.genes.size
            return
        X, V = columns(adata.layers[xkey], genes), columns(adata.layers[vkey], genes)
        finite = np.isfinite(V.sum(0))  # genes with NaN (or inf) velocity in any cell are dropped
        X, V = X[:, finite], V[:, finite]
        self.n_genes = X.shape[1]
        if self.n_genes == 0:  # _prepare says why
            return
        if approx is True and X.shape[1] > 100:
            from scanpy.preprocessing import pca

            X_pca, pcs, _, _ = pca(X, n_comps=30, svd_solver="arpack", return_info=True)
            X = np.array(X_pca, dtype=np.float32)
            V_pca = (V - V.mean(0)).dot(pcs.T)
            V_pca[V.sum(1) == 0] = 0
            V = np.asarray(V_pca, dtype=np.float32)
        if sqrt_transform:
            V = _signed_sqrt(V)
        V -= np.nanmean(V, axis=1)[:, None]
        self.X, self.V = np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(V)
        self.n_genes = X.shape[1]  # principal components with approx

    def _velocity_genes_and_means(self, genes):
        """One pass over the lazy velocities: the genes without a non-finite value, and each cell's mean over
        them (after the transform)."""
        candidates = np.flatnonzero(genes)
        keep, total = [], np.zeros(self.v_layer.shape[0])
        for block, (V,) in column_blocks([self.v_layer], candidates, gene_block_size(self.v_layer.shape[0])):
            finite = np.isfinite(V).all(0)
            keep.append(block[finite])
            V = V[:, finite]
            total += (_signed_sqrt(V) if self.sqrt_transform else V).sum(1, dtype=np.float64)
        keep = np.concatenate(keep) if keep else candidates
        return keep, total / max(keep.size, 1)

    def renumber(self, order: np.ndarray) -> None:
        """From now on, cell ``k`` (in :meth:`blocks`' rows and states) is the data's cell ``order[k]``."""
        self.order = order
        if self.lazy:
            self.v_mean = self.v_mean[order]
        else:  # one at a time: one array's copy more at the peak
            self.X = self.X[order]
            self.V = self.V[order]

    def blocks(self, rows: slice):
        if not self.lazy:
            yield self.X, self.V[rows]
            return
        size = gene_block_size(self.x_layer.shape[0])
        if self.order is None:
            reads = column_blocks([self.x_layer, self.v_layer[rows]], self.genes, size)
        else:  # renumbered cells, gathered as the blocks are cut
            reads = column_blocks([self.x_layer, self.v_layer], self.genes, size, take=[self.order, self.order[rows]])
        for _, (X, V) in reads:
            if self.sqrt_transform:
                V = _signed_sqrt(V)
            yield X, V - self.v_mean[rows, None].astype(np.float32)  # column_blocks' blocks are contiguous


def _prepare(adata, vkey, xkey, gene_subset, approx, sqrt_transform) -> _States:
    """The states and velocities to correlate, with the checks and scVelo's choice of the transform."""
    for key, fix in ((vkey, "Run fv.tl.velocity first or pass the right vkey."),
                     (xkey, "Run fv.pp.moments first or pass xkey (e.g. xkey='spliced').")):  # fmt: skip
        if key not in adata.layers:
            raise KeyError(f"adata.layers has no '{key}' (it has {list(adata.layers.keys())}). {fix}")
    genes = _gene_subset(adata, vkey, gene_subset)
    if sqrt_transform is None:
        params = adata.uns.get(_keys.PARAMS.format(key=vkey), {})
        if hasattr(params, "get"):  # the fit's own choice, else scVelo's rule
            sqrt_transform = params.get("sqrt_transform", params.get("mode", None) == "stochastic")
    states = _States(adata, vkey, xkey, genes, bool(sqrt_transform), approx)
    if states.n_genes == 0:
        raise ValueError(
            f"No genes left for the velocity graph: {int(genes.sum())} gene(s) selected "
            f"(var['{_keys.VELOCITY_GENES.format(key=vkey)}'] / gene_subset), all of them with NaN velocity in "
            "some cell. Check the velocity fit or pass gene_subset."
        )
    return states


def _pair_sums_numpy(X, V, first, indptr, indices, sqrt_transform, sums):
    """Add, for every stored pair (i, j), the sums over these genes of d, d * d and d * v_i to ``sums``, with
    ``d = f(x_j - x_i)``. ``V`` and the pairs' rows (``indptr``) are those of cells ``first, first + 1, ...``;
    ``X`` holds every cell. In the layers' precision (float32, as scVelo and the numba kernel), in small blocks."""
    rows = np.repeat(np.arange(V.shape[0]), np.diff(indptr))
    step = max(1, _CHUNK_ELEMENTS // max(X.shape[1], 1))
    for start in range(0, indices.size, step):
        r, c = rows[start : start + step], indices[start : start + step]
        d = X[c] - X[first + r]
        if sqrt_transform:
            d = _signed_sqrt(d)
        sums[0, start : start + step] += d.sum(1)
        sums[1, start : start + step] += np.einsum("ij,ij->i", d, d)
        sums[2, start : start + step] += np.einsum("ij,ij->i", d, V[r])


def _use_numba(backend: str, states: _States) -> bool:
    """``'auto'`` takes numba once its kernels are compiled; before that, numpy, while they compile in child
    processes (a first compile costs more than numpy's whole graph), except for lazy layers (large data)."""
    if backend != "auto":
        return backend == "numba"
    if not HAS_NUMBA:
        return False
    kernels = projection_kernels()
    if ready((kernels.hood, kernels.pair_sums)) or states.lazy:
        return True
    compile_in_children(*PROJECTION_KERNELS)
    return False


def _cosines(states: _States, rows: slice, indptr, indices, backend="auto"):
    """Centred cosine of ``f(x_j - x_i)`` with the prepared ``v_i`` for every stored pair of cells ``rows``."""
    if backend == "numba" and not HAS_NUMBA:
        raise ImportError("backend='numba' needs numba (pip install numba).")
    if backend == "numba":
        _announce()
    indptr, indices = indptr.astype(np.int64, copy=False), indices.astype(np.int64, copy=False)
    sums = np.zeros((3, indices.size), np.float32)
    v_sum = np.zeros(rows.stop - rows.start)
    v_sq = np.zeros_like(v_sum)
    for X, V in states.blocks(rows):
        if backend == "numba":
            with cpu_threads(indices.size * X.shape[1]):
                projection_kernels().pair_sums(X, V, rows.start, indptr, indices, states.sqrt_transform, sums)
        else:
            _pair_sums_numpy(X, V, rows.start, indptr, indices, states.sqrt_transform, sums)
        v_sum += V.sum(1, dtype=np.float64)
        v_sq += np.einsum("ij,ij->i", V, V, dtype=np.float64)
    return _correlations(sums, v_sum, np.sqrt(v_sq), indptr, states.n_genes)


def _correlations(sums, v_sum, v_norm, indptr, n_genes):
    """The centred cosines from the pairs' sums over genes (and each row's velocity sum and norm)."""
    rows = np.repeat(np.arange(v_sum.size), np.diff(indptr))
    out = np.empty(sums.shape[1], np.float32)
    for start in range(0, out.size, _FINISH_PAIRS):
        part = slice(start, start + _FINISH_PAIRS)
        s1, s2, s3 = (sums[k, part].astype(np.float64) for k in range(3))
        r = rows[part]
        m = s1 / n_genes
        den = np.sqrt(np.maximum(s2 - m * s1, 0)) * v_norm[r]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[part] = np.where(den > 0, (s3 - m * v_sum[r]) / den, 0.0)
    return out


def _announce() -> None:
    kernels = projection_kernels()
    announce_compile("the velocity graph's kernels", (kernels.hood, kernels.pair_sums))


def _split_signs(vals, indptr, indices, n):
    """Two csr matrices from the values on a csr pattern (rows of cells, ``n`` columns): the positive and the
    negative entries."""
    out = []
    for keep in (vals > 0, vals < 0):
        ptr = np.concatenate([[0], np.cumsum(keep)])[indptr]
        itype = np.int32 if vals.size < 2**31 else np.int64
        shape = (indptr.size - 1, n)
        out.append(sp.csr_matrix((vals[keep], indices[keep].astype(itype), ptr.astype(itype)), shape=shape))
    return tuple(out)


def _stack_rows(parts: list[sp.csr_matrix], order: np.ndarray | None = None) -> sp.csr_matrix:
    """The csr blocks of consecutive rows as one matrix. ``parts`` is emptied as it is copied, so that the peak
    memory is about one copy of the graph, not two.

    With ``order``, the blocks hold cells renumbered by it (row and column ``k`` are the data's cell
    ``order[k]``): each row goes back to its cell, with its columns renumbered back and sorted.
    """
    if len(parts) == 1 and order is None:
        return parts.pop()
    nnz, n_cols = sum(p.nnz for p in parts), parts[0].shape[1]
    counts = np.concatenate([np.diff(p.indptr) for p in parts])
    if order is not None:
        counts[order] = counts.copy()
    itype = np.int32 if max(nnz, n_cols) < 2**31 else np.int64
    data, indices = np.empty(nnz, parts[0].dtype), np.empty(nnz, itype)
    indptr = np.zeros(counts.size + 1, itype)
    np.cumsum(counts, out=indptr[1:])
    row = 0
    while parts:
        part = parts.pop(0)
        if order is None:
            at = indptr[row]
            data[at : at + part.nnz], indices[at : at + part.nnz] = part.data, part.indices
        else:
            starts = indptr[order[row : row + part.shape[0]]].astype(np.int64)
            into = np.repeat(starts - part.indptr[:-1], np.diff(part.indptr)) + np.arange(part.nnz)
            data[into], indices[into] = part.data, order[part.indices]
        row += part.shape[0]
        del part
    out = sp.csr_matrix((data, indices, indptr), shape=(counts.size, n_cols))
    if order is not None:
        out.sort_indices()
    return out


def _row_blocks(pattern: sp.csr_matrix, n_recurse: int, use_numba: bool) -> list[slice]:
    """Consecutive ranges of cells with at most :data:`LAZY_GRAPH_PAIRS` pairs each (at least one cell)."""
    n = pattern.shape[0]
    if use_numba:
        counts = _hood_sizes(pattern, n_recurse, 0, n)[1]
    else:
        step = 1 << 15
        counts = np.concatenate([
            np.diff(neighbourhood(pattern, n_recurse, use_numba=False, rows=slice(a, a + step)).indptr)
            for a in range(0, n, step)
        ])  # fmt: skip
    ends = np.cumsum(counts)
    blocks, first = [], 0
    while first < n:
        done = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, done + LAZY_GRAPH_PAIRS, side="right")))
        blocks.append(slice(first, last))
        first = last
    return blocks


def velocity_graph(
    adata: AnnData,
    *,
    vkey: str = _keys.VELOCITY,
    xkey: str = _keys.MS,
    n_neighbors: int | None = None,
    n_recurse_neighbors: int | None = None,
    sqrt_transform: bool | None = None,
    gene_subset: Sequence[str] | np.ndarray | None = None,
    approx: bool | None = None,
    backend: str = "auto",
    copy: bool = False,
) -> AnnData | None:
    r"""Cosine correlations between each cell's velocity and its displacements to neighbouring cells.

    For cell :math:`i` and each cell :math:`j` of its neighbourhood,
    :math:`\pi_{ij} = \mathrm{corr}(f(x_j - x_i), f(v_i))`, the Pearson (centred cosine) correlation over
    genes, with :math:`f(z) = \mathrm{sign}(z)\sqrt{|z|}` when ``sqrt_transform`` else the identity. This is
    scVelo's ``velocity_graph`` (``mode_neighbors='distances'``), computed vectorised; it matches scVelo to
    about 1e-6.

    Genes: ``gene_subset`` if given, else ``var['<vkey>_genes']`` when present, else all genes; of these, genes
    whose velocity has a NaN (or inf) in any cell are dropped. The neighbourhood of a cell is the cell, its ``k``
    nearest neighbours in ``obsp['distances']`` (``k`` = the smallest number of neighbours any cell has, capped
    by ``n_neighbors``) and, recursively, their neighbours, ``n_recurse_neighbors`` levels deep. Cells whose
    velocity is constant over genes get no edges. NaN correlations (e.g. identical states) are set to 0.

    Dask-backed layers (``layers[xkey]`` or ``layers[vkey]``) are read in blocks of genes, and the correlations'
    sums over genes add up block by block, for blocks of cells with at most 2^25 pairs (33,554,432).
    Memory then holds the graph itself (8 bytes per stored pair) and one block's pairs, never a dense cells x
    genes matrix; each block of cells reads the states once more.

    Above 32,768 cells the pairs are computed on cells renumbered so that neighbours' states sit close in
    memory (reverse Cuthill-McKee on the kNN graph), and the graph is put back in the data's order; the
    results are the same (to float32 rounding).

    Parameters
    ----------
    adata
        Annotated data with ``layers[vkey]``, ``layers[xkey]`` and ``obsp['distances']``.
    vkey
        Layer with the velocities.
    xkey
        Layer with the states (smoothed spliced abundances).
    n_neighbors
        Use at most this many nearest neighbours of each cell. Must not exceed those in the graph.
    n_recurse_neighbors
        Levels of neighbours-of-neighbours. Default: 2, or 1 when ``n_neighbors`` is given (as scVelo).
    sqrt_transform
        Variance-stabilise displacements and velocities by :math:`\mathrm{sign}(z)\sqrt{|z|}`. Default: the
        fit's ``uns['<vkey>_params']['sqrt_transform']`` where it recorded one (``preset='paper'`` records True,
        as the paper's pipeline gets it from scVelo), else True when its ``mode`` is ``'stochastic'`` and
        False otherwise (scVelo's rule).
    gene_subset
        Gene names (or a boolean mask over ``var_names``) to use instead of ``var['<vkey>_genes']``.
    approx
        If True and more than 100 genes are used, correlate in the space of the first 30 principal components
        of the states (as scVelo).
    backend
        ``'auto'``, ``'numba'`` or ``'numpy'``. ``'auto'`` takes numba when its kernels are compiled (in this
        process or in numba's cache); before that, numpy, while child processes compile them (they finish even
        where this process exits first).
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    Returns a copy when ``copy=True``, else None; sets

    ``adata.uns['<vkey>_graph']``
        :class:`~scipy.sparse.csr_matrix` (n_obs x n_obs) of the positive correlations.
    ``adata.uns['<vkey>_graph_neg']``
        :class:`~scipy.sparse.csr_matrix` of the negative correlations.
    ``adata.obs['<vkey>_self_transition']``
        Self-transition probability of each cell, clip(98th percentile of the row maxima - row maximum, 0, 1).
    ``adata.uns['<vkey>_params']``
        Updated (not replaced) with ``'mode_neighbors'`` and ``'n_recurse_neighbors'``; any ``'embeddings'``
        entry is removed since earlier projections are stale.
    """
    if backend not in {"auto", "numba", "numpy"}:
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}.")
    if n_recurse_neighbors is None:
        n_recurse_neighbors = 1 if n_neighbors is not None else 2
    if int(n_recurse_neighbors) < 1:
        raise ValueError(f"n_recurse_neighbors must be >= 1, got {n_recurse_neighbors}.")

    states = _prepare(adata, vkey, xkey, gene_subset, approx, sqrt_transform)
    dist = _get_distances(adata)
    if dist.shape != (adata.n_obs, adata.n_obs):
        raise ValueError(f"obsp['{_keys.DISTANCES}'] has shape {dist.shape}, expected ({adata.n_obs}, {adata.n_obs}).")
    if n_neighbors is not None:
        have = adata.uns.get(_keys.NEIGHBORS, {}).get("params", {}).get("n_neighbors", int(np.diff(dist.indptr).min()))
        if n_neighbors > have:
            raise ValueError(
                f"n_neighbors={n_neighbors} exceeds the {have} neighbours of the kNN graph; recompute the graph "
                f"with more neighbours (scanpy.pp.neighbors(n_neighbors={n_neighbors})) or lower n_neighbors."
            )
    if backend == "auto":
        backend = "numba" if _use_numba(backend, states) else "numpy"
    if backend == "numba" and not HAS_NUMBA:
        raise ImportError("backend='numba' needs numba (pip install numba).")
    pattern = knn_indices(dist, n_neighbors)
    order = locality_order(pattern)
    if order is not None:  # renumbered so that neighbours' states sit close in memory; undone below
        pattern = renumber(pattern, order)
        states.renumber(order)
    use_numba = backend == "numba"
    # lazy layers: blocks of cells, so that only a block's pairs and sums are held at once
    blocks = _row_blocks(pattern, int(n_recurse_neighbors), use_numba) if states.lazy else [slice(0, adata.n_obs)]
    if states.lazy:
        release_memory()  # earlier Dask computations' freed heap, before the graph is built
    positive, negative, confidence = [], [], np.zeros(adata.n_obs, np.float32)
    for rows in blocks:
        hood = neighbourhood(pattern, int(n_recurse_neighbors), use_numba=use_numba, rows=rows)
        vals = _cosines(states, rows, hood.indptr, hood.indices, backend)
        vals = np.clip(np.nan_to_num(vals, nan=0.0), -1, 1)
        pos, neg = _split_signs(vals, hood.indptr, hood.indices, adata.n_obs)
        positive.append(pos)
        negative.append(neg)
        # every row holds the cell itself, so reduceat sees no empty segment
        if vals.size:
            confidence[rows] = np.maximum.reduceat(np.maximum(vals, 0), hood.indptr[:-1])
        del hood, vals, pos, neg
    graph, graph_neg = _stack_rows(positive, order), _stack_rows(negative, order)
    if order is not None:
        confidence = restore_rows(confidence, order)
    self_prob = np.clip(np.percentile(confidence, 98) - confidence, 0, 1)

    adata = adata.copy() if copy else adata
    save_many(
        adata,
        [
            ("uns", _keys.GRAPH.format(key=vkey), graph),
            ("uns", _keys.GRAPH_NEG.format(key=vkey), graph_neg),
            ("obs", f"{vkey}_self_transition", self_prob),
        ],
    )
    pkey = _keys.PARAMS.format(key=vkey)
    params = adata.uns.get(pkey)
    if not isinstance(params, MutableMapping):
        params = {}
    params.pop("embeddings", None)  # projections of an earlier graph are stale
    params.update(mode_neighbors="distances", n_recurse_neighbors=int(n_recurse_neighbors))
    adata.uns[pkey] = params
    logger.debug("velocity graph: %d positive, %d negative entries", graph.nnz, graph_neg.nnz)
    return adata if copy else None
