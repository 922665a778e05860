"""Velocity graph: cosine correlations between velocities and displacements to neighbours (scVelo's definition)."""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from .._jit import announce_compile, compile_in_background, ready, start_background
from .._lazy import is_lazy
from .._threads import cpu_threads
from .._utils import logger, save_many

try:  # numba comes with scanpy and umap-learn (dependencies); numpy/scipy paths below are the fallback
    import numba
except ImportError:  # pragma: no cover
    numba = None
else:
    from .._jit import ensure_cache_dir

    ensure_cache_dir(__file__)  # before the kernels below are defined

__all__ = ["velocity_graph"]

_CHUNK_ELEMENTS = 1 << 22  # pairs x genes per block in the numpy path
LAZY_GRAPH_CELLS = 1 << 15  # cells per block when the layers are lazy (their velocities and pairs)


def _get_distances(adata: AnnData) -> sp.csr_matrix:
    """The kNN distance graph, from obsp (or the legacy uns['neighbors'])."""
    if _keys.DISTANCES in adata.obsp:
        dist = adata.obsp[_keys.DISTANCES]
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


def neighbourhood(
    pattern: sp.csr_matrix, n_recurse_neighbors: int, *, use_numba: bool | None = None, rows: slice | None = None
) -> sp.csr_matrix:
    """Each cell, its neighbours and (recursively) their neighbours: the support of ``(I + A) ** n``.

    Rows hold sorted column indices; values are 1. ``rows`` (a contiguous range) limits the result to those
    cells' rows. ``use_numba`` None: whenever numba is installed.
    """
    n = pattern.shape[0]
    first, last, _ = (rows or slice(0, n)).indices(n)
    if (numba is not None if use_numba is None else use_numba) and n > 0:
        _announce()
        knn = np.ascontiguousarray(pattern.indices.reshape(n, -1), dtype=np.int64)
        counts = np.empty(last - first, np.int64)
        _hood_kernel(knn, int(n_recurse_neighbors), first, counts, counts, np.empty(0, np.int64), True)
        indptr = np.zeros(last - first + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), np.int64)
        _hood_kernel(knn, int(n_recurse_neighbors), first, counts, indptr, indices, False)
        return sp.csr_matrix((np.ones(indices.size, np.float32), indices, indptr), shape=(last - first, n))
    step = (sp.identity(n, dtype=np.float32, format="csr") + pattern).tocsr()
    step.data[:] = 1
    out = step[first:last]
    for _ in range(n_recurse_neighbors - 1):
        out = (out @ step).tocsr()
        out.data[:] = 1
    out.sort_indices()
    return out


if numba is not None:

    # count trailing zeros of a power of two with a de Bruijn multiplication
    _DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)
    _CTZ_TABLE = np.zeros(64, np.int64)
    _CTZ_TABLE[[((1 << b) * int(_DEBRUIJN) % 2**64) >> 58 for b in range(64)]] = np.arange(64)

    @numba.njit(parallel=True, cache=True)
    def _hood_kernel(knn, n_recurse, first, counts, indptr, indices, count_only):  # pragma: no cover (compiled)
        # breadth-first search n_recurse levels deep from cells first, first + 1, ... (one per entry of counts),
        # in blocks of rows; each block owns a bitmap of visited cells, read back in order (sorted output
        # without a sort) when the visited span is small enough
        n, k = knn.shape
        n_rows = counts.size
        n_blocks = min(n_rows, 64)
        one = np.uint64(1)
        for b in numba.prange(n_blocks):
            bits = np.zeros((n + 63) // 64, np.uint64)
            buf = np.empty(n, np.int64)
            for r in range(b * n_rows // n_blocks, (b + 1) * n_rows // n_blocks):
                i = first + r
                buf[0] = i
                bits[i >> 6] |= one << np.uint64(i & 63)
                size, lo, j_min, j_max = 1, 0, i, i
                for _ in range(n_recurse):
                    hi = size
                    for q in range(lo, hi):
                        for m in range(k):
                            j = knn[buf[q], m]
                            bit = one << np.uint64(j & 63)
                            if bits[j >> 6] & bit == 0:
                                bits[j >> 6] |= bit
                                buf[size] = j
                                size += 1
                                j_min, j_max = min(j_min, j), max(j_max, j)
                    lo = hi
                if count_only:
                    counts[r] = size
                    for q in range(size):
                        bits[buf[q] >> 6] = 0
                elif (j_max >> 6) - (j_min >> 6) < 8 * size:
                    pos = indptr[r]
                    for w in range(j_min >> 6, (j_max >> 6) + 1):
                        word = bits[w]
                        while word != 0:
                            low = word & (~word + one)
                            indices[pos] = (w << 6) + _CTZ_TABLE[(low * _DEBRUIJN) >> np.uint64(58)]
                            pos += 1
                            word ^= low
                        bits[w] = 0
                else:
                    indices[indptr[r] : indptr[r] + size] = np.sort(buf[:size])
                    for q in range(size):
                        bits[buf[q] >> 6] = 0


def _prepare(adata, vkey, xkey, gene_subset, approx, sqrt_transform):
    """X (states) and V (velocities) as scVelo's VelocityGraph prepares them, plus the resolved sqrt flag.

    V comes as a function of a range of cells: for lazy layers it reads and prepares those cells' velocities
    only (the graph is then built in blocks of cells); otherwise it slices V, prepared once.
    """
    if vkey not in adata.layers:
        raise KeyError(
            f"adata.layers has no '{vkey}' (it has {list(adata.layers.keys())}). "
            "Run fv.tl.velocity first or pass the right vkey."
        )
    if xkey not in adata.layers:
        raise KeyError(
            f"adata.layers has no '{xkey}' (it has {list(adata.layers.keys())}). "
            "Run fv.pp.moments first or pass xkey (e.g. xkey='spliced')."
        )
    if gene_subset is not None:
        gene_subset = np.asarray(gene_subset)
        if gene_subset.dtype == bool:
            if gene_subset.shape != (adata.n_vars,):
                raise ValueError(f"A boolean gene_subset needs length n_vars={adata.n_vars}, got {gene_subset.shape}.")
            subset = gene_subset.copy()
        else:
            subset = np.asarray(adata.var_names.isin(gene_subset))
            if not subset.any():
                raise ValueError(f"None of gene_subset ({gene_subset[:5].tolist()} ...) is in adata.var_names.")
    else:
        key = _keys.VELOCITY_GENES.format(key=vkey)
        subset = np.array(adata.var[key].values, dtype=bool) if key in adata.var else np.ones(adata.n_vars, bool)

    lazy = is_lazy(adata.layers[vkey]) or is_lazy(adata.layers[xkey])

    def dense(layer, rows=slice(None)):  # only the used genes' columns (and rows), computed if lazy
        x = adata.layers[layer][rows][:, subset] if rows != slice(None) else adata.layers[layer][:, subset]
        x = x.compute() if is_lazy(x) else x
        return x.toarray() if sp.issparse(x) else np.asarray(x)

    if lazy and approx is not True:  # V is read in blocks of cells later; here only its non-finite genes
        v = adata.layers[vkey][:, subset]
        nan_genes = ~np.isfinite(np.asarray(v.sum(0).compute() if is_lazy(v) else v.sum(0)).ravel())
        X, V = dense(xkey), None
    else:
        X, V = dense(xkey), dense(vkey)
        nan_genes = ~np.isfinite(V.sum(0))  # genes with NaN (or inf) velocity in any cell are dropped
    if nan_genes.any():
        X = X[:, ~nan_genes]
        V = None if V is None else V[:, ~nan_genes]
    if X.shape[1] == 0:
        raise ValueError(
            f"No genes left for the velocity graph: {int(subset.sum())} gene(s) selected "
            f"(var['{_keys.VELOCITY_GENES.format(key=vkey)}'] / gene_subset), {int(nan_genes.sum())} of them with "
            "NaN velocity. Check the velocity fit or pass gene_subset."
        )

    if sqrt_transform is None:
        params = adata.uns.get(_keys.PARAMS.format(key=vkey), {})
        if hasattr(params, "get"):  # the fit's own choice, else scVelo's rule
            sqrt_transform = params.get("sqrt_transform", params.get("mode", None) == "stochastic")
    sqrt_transform = bool(sqrt_transform)

    def finish(V):  # the transform and the centring act on each cell alone
        if sqrt_transform:
            V = np.sqrt(np.abs(V)) * np.sign(V)
        V -= np.nanmean(V, axis=1)[:, None]
        return np.ascontiguousarray(V)

    if approx is True and X.shape[1] > 100:
        from scanpy.preprocessing import pca

        X_pca, pcs, _, _ = pca(X, n_comps=30, svd_solver="arpack", return_info=True)
        X = np.array(X_pca, dtype=np.float32)
        V_pca = (V - V.mean(0)).dot(pcs.T)
        V_pca[V.sum(1) == 0] = 0
        V = V_pca
    X = np.ascontiguousarray(X, dtype=np.float32)  # this function's own copy (of the used genes)
    if V is not None:
        V = finish(np.asarray(V, dtype=np.float32))
        return X, lambda rows: V[rows], sqrt_transform
    keep = ~nan_genes
    return X, lambda rows: finish(np.asarray(dense(vkey, rows)[:, keep], dtype=np.float32)), sqrt_transform


def _cosines_numpy(X, V, indptr, indices, sqrt_transform, first=0):
    """Centred cosine of ``f(x_j - x_i)`` with ``v_i`` for every stored pair, in blocks of pairs.

    ``V`` and the pairs' rows (``indptr``) are those of cells ``first, first + 1, ...``; ``X`` holds every cell.
    """
    n_genes = X.shape[1]
    rows = np.repeat(np.arange(V.shape[0]), np.diff(indptr))
    v_sum = V.astype(np.float64).sum(1)
    v_norm = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64))
    out = np.empty(indices.size, np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(n_genes, 1))
    for start in range(0, indices.size, step):
        r, c = rows[start : start + step], indices[start : start + step]
        d = (X[c] - X[first + r]).astype(np.float64)
        if sqrt_transform:
            d = np.sqrt(np.abs(d)) * np.sign(d)
        s1 = d.sum(1)
        s2 = np.einsum("ij,ij->i", d, d)
        s3 = np.einsum("ij,ij->i", d, V[r])
        num = s3 - s1 / n_genes * v_sum[r]
        den = np.sqrt(np.maximum(s2 - s1 * s1 / n_genes, 0)) * v_norm[r]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start : start + step] = np.where(den > 0, num / den, 0.0)
    return out


if numba is not None:

    @numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
    def _cosines_kernel(X, V, first, indptr, indices, sqrt_transform, out):  # pragma: no cover (compiled)
        # float32 like scVelo; the transform and the sums run in separate loops so both vectorise. Row r of V
        # and of indptr is cell first + r; X holds every cell.
        n_genes = X.shape[1]
        for r in numba.prange(V.shape[0]):
            xi, vi = X[first + r], V[r]
            v_sum, v_sq = 0.0, 0.0
            for g in range(n_genes):
                v_sum += vi[g]
                v_sq += np.float64(vi[g]) * vi[g]
            v_norm = math.sqrt(v_sq)
            d = np.empty(n_genes, np.float32)
            for p in range(indptr[r], indptr[r + 1]):
                xj = X[indices[p]]
                for g in range(n_genes):
                    d[g] = xj[g] - xi[g]
                if sqrt_transform:
                    for g in range(n_genes):
                        d[g] = np.sign(d[g]) * np.sqrt(np.abs(d[g]))
                s1, s2, s3 = np.float32(0), np.float32(0), np.float32(0)
                for g in range(n_genes):
                    s1 += d[g]
                    s2 += d[g] * d[g]
                    s3 += d[g] * vi[g]
                m = np.float64(s1) / n_genes
                den = math.sqrt(max(np.float64(s2) - m * s1, 0.0)) * v_norm
                out[p] = (np.float64(s3) - m * v_sum) / den if den > 0 else 0.0


def _use_numba(backend: str, X: np.ndarray, V: np.ndarray) -> bool:
    """``'auto'`` takes numba once its kernels are compiled; before that, numpy, while they compile in the
    background (a first compile costs more than numpy's whole graph)."""
    if backend != "auto":
        return backend == "numba"
    if numba is None:
        return False
    if ready((_hood_kernel, _cosines_kernel)):
        return True
    compile_in_background("the velocity graph's kernels", lambda: _warm_up(X, V))
    return False


def _warm_up(X: np.ndarray, V: np.ndarray) -> None:
    """Call the kernels on two cells, with the argument types of the real call (so that it finds them compiled)."""
    knn = np.array([[1], [0]], np.int64)
    counts = np.empty(2, np.int64)
    _hood_kernel(knn, 1, 0, counts, counts, np.empty(0, np.int64), True)
    indptr, indices = np.array([0, 1, 2], np.int64), np.array([1, 0], np.int64)
    _cosines_kernel(X[:2], V[:2], 0, indptr, indices, False, np.empty(2, np.float64))


def _cosines(X, V, indptr, indices, sqrt_transform, backend="auto", first=0):
    if backend == "numpy" or (backend == "auto" and numba is None):
        return _cosines_numpy(X, V, indptr, indices, sqrt_transform, first)
    if numba is None:
        raise ImportError("backend='numba' needs numba (pip install numba).")
    _announce()
    out = np.empty(indices.size, np.float64)
    with cpu_threads(indices.size * X.shape[1]):
        args = (indptr.astype(np.int64), indices.astype(np.int64), bool(sqrt_transform), out)
        _cosines_kernel(X, V, int(first), *args)
    return out


def _announce() -> None:
    announce_compile("the velocity graph's kernels", (_hood_kernel, _cosines_kernel))


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
        process or in numba's cache); before that, numpy, while numba compiles them in a background thread.
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

    X, velocities, sqrt_transform = _prepare(adata, vkey, xkey, gene_subset, approx, sqrt_transform)
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
        backend = "numba" if _use_numba(backend, X, velocities(slice(0, 2))) else "numpy"
    if backend == "numba" and numba is None:
        raise ImportError("backend='numba' needs numba (pip install numba).")
    pattern = knn_indices(dist, n_neighbors)
    # lazy layers: blocks of cells, so that only a block's velocities and pairs are held at once
    step = LAZY_GRAPH_CELLS if is_lazy(adata.layers[vkey]) or is_lazy(adata.layers[xkey]) else adata.n_obs
    parts, confidence = [], np.zeros(adata.n_obs, np.float32)
    for first in range(0, adata.n_obs, step):
        rows = slice(first, min(first + step, adata.n_obs))
        hood = neighbourhood(pattern, int(n_recurse_neighbors), use_numba=backend == "numba", rows=rows)
        vals = _cosines(X, velocities(rows), hood.indptr, hood.indices, sqrt_transform, backend, first=first)
        vals = np.clip(np.nan_to_num(vals, nan=0.0), -1, 1).astype(np.float32)
        parts.append(_split_signs(vals, hood.indptr, hood.indices, adata.n_obs))
        # every row holds the cell itself, so reduceat sees no empty segment
        if vals.size:
            confidence[rows] = np.maximum.reduceat(np.maximum(vals, 0), hood.indptr[:-1])
        del hood, vals
    graph, graph_neg = (parts[0][k] if len(parts) == 1 else sp.vstack([p[k] for p in parts], "csr") for k in (0, 1))
    self_prob = np.clip(np.percentile(confidence, 98) - confidence, 0, 1)

    start_background()  # a compile queued by _use_numba, now that this call's own work is done
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
