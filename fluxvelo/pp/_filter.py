"""Gene filtering and per-cell normalisation with scVelo's semantics (``scv.pp.filter_and_normalize``)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._keys import SPLICED, UNSPLICED
from ._anndata import replace_inplace
from ._checks import check_counts, check_nonempty, get_matrix

logger = logging.getLogger("fluxvelo")

_INITIAL_SIZE = "initial_size"  # obs: counts per cell of X before gene filtering
_N_COUNTS = "n_counts"  # obs: counts per cell of X after normalisation
_GENE_COUNT_CORR = "gene_count_corr"  # var: scVelo's gene / n-genes correlation (only for > 3,000 genes)


def row_sums(x: Any) -> np.ndarray:
    """Counts per cell in the matrix's own dtype (as scVelo's ``get_size``)."""
    s = x.sum(axis=1)
    return np.asarray(s).ravel()


def _col_sums(x: Any) -> np.ndarray:
    return np.asarray(x.sum(axis=0)).ravel()


def shared_counts(xs: Any, xu: Any) -> np.ndarray:
    """Per gene, the spliced plus unspliced counts of the cells where both are non-zero."""
    if sparse.issparse(xs) or sparse.issparse(xu):
        xs, xu = sparse.csr_matrix(xs), sparse.csr_matrix(xu)
        return _col_sums(xs.multiply(xu > 0)) + _col_sums(xu.multiply(xs > 0))
    xs, xu = np.asarray(xs), np.asarray(xu)
    both = (xs > 0) & (xu > 0)
    return np.where(both, xs, 0).sum(0) + np.where(both, xu, 0).sum(0)


def looks_raw(x: Any) -> bool:
    """True when the first cells hold (near-)integer values, scVelo's test for unnormalised counts."""
    head = x[:5]
    vals = np.ravel(head.data if sparse.issparse(head) else np.asarray(head))
    return bool(np.allclose(vals % 1, 0, atol=1e-3))


def _as_float(x: Any) -> Any:
    """Integer matrices become float32 (as scVelo does before normalising)."""
    return x.astype(np.float32) if x.dtype.kind in "iub" else x


def scale_rows(x: Any, counts: np.ndarray) -> Any:
    """Divide each row of ``x`` by ``counts``, in place for float matrices; sparse stays sparse."""
    if sparse.issparse(x):
        if x.format not in ("csr", "csc"):
            x = sparse.csr_matrix(x)
        inv = 1 / counts
        x.data *= inv[x.indices] if x.format == "csc" else np.repeat(inv, np.diff(x.indptr))
        return x
    x = np.asarray(x)
    x /= counts[:, None]
    return x


def _size_factors(counts: np.ndarray) -> np.ndarray:
    """Counts relative to their median; empty cells get factor 1 (scVelo's convention)."""
    target = np.median(counts)
    target = target + (target == 0)
    factors = counts / target
    return factors + (factors == 0)


def gene_count_corr(x: Any) -> np.ndarray:
    """Pearson correlation of each gene with the number of genes detected per cell, rounded to 4 decimals."""
    n = x.shape[0]
    y = np.asarray((x > 0).sum(1), dtype=np.float64).ravel()
    yc = y - y.mean()
    if sparse.issparse(x):
        xd = sparse.csc_matrix(x, dtype=np.float64)
        sx, sxx = _col_sums(xd), _col_sums(xd.multiply(xd))
        sxy = np.asarray(xd.T @ yc).ravel()
    else:
        xd = np.asarray(x, dtype=np.float64)
        sx, sxx, sxy = xd.sum(0), (xd * xd).sum(0), xd.T @ yc
    var_x = sxx - sx * sx / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.round(sxy / np.sqrt(var_x * (yc @ yc)), 4)


def normalize_layers(
    adata: AnnData, layers: Sequence[str], *, enforce: bool = False, inplace_matrices: bool = False
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """Normalise ``layers`` of ``adata`` per cell to the median initial size, without writing to ``adata``.

    Each matrix is scaled by its ``obs['initial_size_<layer>']`` (``obs['initial_size']`` for X), or by its
    current counts when that column is absent. Matrices that do not look like raw counts are skipped unless
    ``enforce``. With ``inplace_matrices`` float matrices are scaled in place (for private copies).

    Returns
    -------
    The new matrices by layer name, var columns to add, and the names of the normalised layers.
    """
    mats: dict[str, Any] = {}
    var_cols: dict[str, np.ndarray] = {}
    done: list[str] = []
    for name in layers:
        x = get_matrix(adata, name)
        x_float = _as_float(x)
        if not (enforce or looks_raw(x_float)):
            logger.warning(
                "Did not normalize %s as it looks processed already. To enforce normalization, set `enforce=True`.",
                name,
            )
            if x_float is not x:
                mats[name] = x_float
            continue
        key = _INITIAL_SIZE if name == "X" else f"{_INITIAL_SIZE}_{name}"
        counts = np.asarray(adata.obs[key]) if key in adata.obs else row_sums(x)
        if x_float is x and not inplace_matrices:
            x_float = x.copy()
        mats[name] = scale_rows(x_float, _size_factors(counts))
        done.append(name)
        if name == "X" and _GENE_COUNT_CORR not in adata.var and mats[name].shape[1] > 3000:
            var_cols[_GENE_COUNT_CORR] = gene_count_corr(mats[name])
    return mats, var_cols, done


def _hvg_table(x: Any, var_names: Any, n_top_genes: int, *, logged: bool) -> Any:
    """scanpy's 'seurat' highly-variable-gene table for ``x`` (log1p-transformed first unless ``logged``)."""
    import scanpy as sc

    if not logged:
        x = x.copy()
        if sparse.issparse(x):
            np.log1p(x.data, out=x.data)
        else:
            np.log1p(x, out=x)
    tmp = AnnData(X=x, uns={"log1p": {"base": None}})
    tmp.var_names = var_names
    with warnings.catch_warnings():
        # fewer genes with a finite dispersion than n_top_genes: all of them are kept, which is what we want
        warnings.filterwarnings("ignore", message=".*n_top_genes.*", category=UserWarning)
        return sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=n_top_genes, inplace=False)


def filter_and_normalize(
    adata: AnnData,
    *,
    min_shared_counts: int | None = 20,
    min_counts: int | None = None,
    n_top_genes: int | None = None,
    log: bool = True,
    layers_normalize: Sequence[str] = (SPLICED, UNSPLICED),
    enforce: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Filter genes by shared counts and normalise X, spliced and unspliced per cell, as scVelo does.

    Same results as ``scvelo.pp.filter_and_normalize`` (followed by ``log1p`` of X and, with ``n_top_genes``,
    scanpy's 'seurat' highly-variable-gene selection, the steps older scVelo versions ran inside it).

    1. Record the counts per cell of spliced, unspliced and X before filtering (kept if already present).
    2. Keep genes with at least ``min_counts`` spliced counts and at least ``min_shared_counts`` counts
       (spliced plus unspliced) in the cells where both are detected.
    3. Divide X and each of ``layers_normalize`` per cell by its initial size over the median initial size.
       Sparse matrices stay sparse.
    4. ``log1p`` of X (only X; the layers stay linear).
    5. With ``n_top_genes``, keep the most variable genes (scanpy flavour 'seurat' on log1p(X)).

    Parameters
    ----------
    adata
        Annotated data with raw counts in X and ``layers['spliced']``, ``layers['unspliced']``.
    min_shared_counts
        Minimum spliced plus unspliced counts over the cells where both are non-zero; None skips the filter.
    min_counts
        Minimum spliced counts per gene; None skips the filter.
    n_top_genes
        Number of highly variable genes to keep; None keeps all.
    log
        Apply ``log1p`` to X after normalising. Skipped, with a warning, when ``uns['log1p']`` shows X is
        logged already.
    layers_normalize
        Layers normalised besides X (those absent are ignored).
    enforce
        Normalise even matrices that do not look like raw counts (scVelo normalises only integer-valued data).
    copy
        Return a modified copy instead of changing ``adata`` in place.

    Returns
    -------
    AnnData | None
        The processed copy if ``copy=True``, else None. Sets or updates:

        - ``X`` and ``layers[...]`` for ``layers_normalize``: normalised (X also log1p-transformed)
        - ``obs['initial_size_spliced']``, ``obs['initial_size_unspliced']``, ``obs['initial_size']``:
          counts per cell before filtering
        - ``obs['n_counts']``: counts per cell of the normalised X (before log1p)
        - ``var['gene_count_corr']``: only when more than 3,000 genes remain, as scVelo
        - ``uns['log1p']`` when ``log``
        - ``var['highly_variable']``, ``var['means']``, ``var['dispersions']``, ``var['dispersions_norm']``,
          ``uns['hvg']`` when ``n_top_genes`` is given
    """
    layers = [name for name in layers_normalize if name in adata.layers]
    check_counts(adata, ["X", *dict.fromkeys([SPLICED, UNSPLICED, *layers])])

    # 1. initial sizes, before any gene is removed
    sizes = {
        f"{_INITIAL_SIZE}_{name}": row_sums(adata.layers[name])
        for name in (UNSPLICED, SPLICED)
        if f"{_INITIAL_SIZE}_{name}" not in adata.obs
    }
    if _INITIAL_SIZE not in adata.obs:
        sizes[_INITIAL_SIZE] = row_sums(adata.X)

    # 2. gene filter
    keep = np.ones(adata.n_vars, dtype=bool)
    if min_counts is not None:
        keep &= _col_sums(adata.layers[SPLICED]) >= min_counts
    if min_shared_counts is not None:
        keep &= shared_counts(adata.layers[SPLICED], adata.layers[UNSPLICED]) >= min_shared_counts
    if not keep.any():
        raise ValueError(
            f"No gene passes min_counts={min_counts}, min_shared_counts={min_shared_counts}; lower the thresholds."
        )
    new = adata[:, keep].copy() if not keep.all() else adata.copy()
    for key, val in sizes.items():
        new.obs[key] = val
    if (~keep).any():
        logger.info(
            "Filtered out %d genes (min_counts=%s spliced, min_shared_counts=%s).",
            int((~keep).sum()),
            min_counts,
            min_shared_counts,
        )

    # 3. normalisation (in place on the private copy)
    mats, var_cols, done = normalize_layers(new, ["X", *layers], enforce=enforce, inplace_matrices=True)
    for name, x in mats.items():
        if name == "X":
            new.X = x
        else:
            new.layers[name] = x
    for key, val in var_cols.items():
        new.var[key] = val
    new.obs[_N_COUNTS] = row_sums(new.X)
    if done:
        logger.info("Normalized count data: %s.", ", ".join(done))

    # 4. log1p of X
    if log and "log1p" in adata.uns:
        logger.warning("Did not log-transform X: uns['log1p'] says it is logarithmized already.")
    elif log:
        vals = new.X.data if sparse.issparse(new.X) else new.X  # float after normalisation: in place
        np.log1p(vals, out=vals)
        new.uns["log1p"] = {"base": None}
        logger.info("Logarithmized X.")

    # 5. highly variable genes
    if n_top_genes is not None:
        table = _hvg_table(new.X, new.var_names, n_top_genes, logged=log or "log1p" in adata.uns)
        for col in ("highly_variable", "means", "dispersions", "dispersions_norm"):
            new.var[col] = table[col].to_numpy()
        new.uns["hvg"] = {"flavor": "seurat"}
        hvg = new.var["highly_variable"].to_numpy()
        new = new[:, hvg].copy()
        logger.info("Extracted %d highly variable genes.", int(hvg.sum()))
    check_nonempty(new, what="the filtered data")

    if copy:
        return new
    replace_inplace(adata, new)
    return None
