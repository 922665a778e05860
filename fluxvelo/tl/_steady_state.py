"""scVelo's stochastic steady-state fit: per-gene ``gamma``, ``r2`` and the velocity-gene selection.

The paper's benchmark runs ``scv.tl.velocity(adata, mode='stochastic')`` before the flux fit, and the velocity
graph then uses the genes that this fit marks in ``var['velocity_genes']``. This module reproduces that
selection (scVelo 0.3.x, ``fit_offset=False``, ``fit_offset2=False``) without importing scVelo:

1. *Extreme-quantile ratio* (the deterministic fit). Per gene, each cell gets the score
   ``Ms / max(Ms) + Mu / max(Mu)`` (maxima clipped below at 1e-3); the cells at or above the upper
   percentile of that score give ``gamma_q = sum(Ms Mu) / sum(Ms^2)``.
2. *Goodness of fit*. ``r2 = 1 - |Mu - gamma_q Ms|^2 / |Mu - mean(Mu)|^2`` over all cells.
3. *Selection*. ``r2 > min_r2``, ``gamma_q > min_ratio``, some positive ``Ms`` and ``Mu``, and
   ``var['highly_variable']`` when present. With fewer than two genes left, scVelo falls back to
   the genes whose ``r2`` exceeds its 80th percentile.
4. *Generalized least squares* (the stochastic fit, on the selected genes only). With the second-order
   moments ``Mss = <s^2>`` and ``Mus = <s u>`` over each cell and its graph neighbours, the targets
   ``var_ss = 2 Mss - Ms`` and ``cov_us = 2 Mus + Mu`` are stacked under the first-order pair; each
   block is divided by the standard deviation of its residual, and the first-order block keeps only
   the cells in the quantile score above or in the upper percentile of ``Ms`` itself. ``gamma`` is
   the slope through the origin of the stacked system. Genes outside the selection keep ``gamma_q``.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .. import _keys
from .._lazy import any_lazy, column_blocks, gene_block_size, in_memory, is_lazy

logger = logging.getLogger("fluxvelo")

__all__ = ["stochastic_velocity_genes"]

_MIN_MAX = 1e-3  # lower clip of the per-gene maxima in the quantile score
_FALLBACK_PERCENTILE = 80  # r2 percentile scVelo falls back to when fewer than two genes pass
DEFAULT_PERC = (5, 95)  # scVelo's percentiles of the extreme-quantile fit


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x)


def _upper_percentile(perc: float | Sequence[float] | None) -> float | None:
    """The percentile scVelo uses without an offset: the upper one of a pair, or the number itself."""
    if perc is None:
        return None
    if isinstance(perc, numbers.Real):
        value = float(perc)
    else:
        values = list(perc)
        if len(values) != 2:
            raise ValueError(f"perc={perc!r} must be a number or a pair (lower, upper) of percentiles.")
        value = float(values[1])
    if not 0 <= value <= 100:
        raise ValueError(f"perc={perc!r}: percentiles must lie in [0, 100].")
    return value


def _above(score: np.ndarray, q: float) -> np.ndarray:
    """Per column, the cells whose score is at or above the column's ``q``-th percentile."""
    return score >= np.percentile(score, q, axis=0)


def _quantile_score(ms: np.ndarray, mu: np.ndarray, maxima: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``Ms / max(Ms) + Mu / max(Mu)`` per gene, in the inputs' precision (this decides ties at the bound)."""
    ms_max, mu_max = (ms.max(axis=0), mu.max(axis=0)) if maxima is None else maxima
    return ms / np.clip(ms_max, _MIN_MAX, None) + mu / np.clip(mu_max, _MIN_MAX, None)


def _slope(x: np.ndarray, y: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """Least-squares slope through the origin per column, summed in ``dtype``; 0 where undefined.

    The sums run over the cells in order, as scVelo's sparse column sums do, so that in float32 the
    extreme-quantile ratio comes out the same to the last bit.
    """
    x = x.astype(dtype, copy=False)
    y = y.astype(dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (x * y).sum(axis=0) / (x * x).sum(axis=0)
    slope[np.isnan(slope)] = 0
    return slope


def _r_squared(residual: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``1 - |residual|^2 / |mu - mean(mu)|^2`` per column (in the inputs' precision, as scVelo); 0 where undefined."""
    total = mu - mu.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - (np.einsum("ij,ij->j", residual, residual) / np.einsum("ij,ij->j", total, total)).astype(np.float64)
    r2[np.isnan(r2)] = 0.0
    return r2


def _averaging_operator(graph: Any) -> sparse.csr_matrix:
    """Each cell and its graph neighbours (positive connectivities) weighted equally, as a float32 CSR matrix."""
    n = graph.shape[0]
    pattern = sparse.csr_matrix(sparse.csr_matrix(graph) > 0, dtype=np.float32) + sparse.identity(n, np.float32)
    pattern = sparse.csr_matrix(pattern)
    pattern.data[:] = 1.0
    counts = np.asarray(pattern.sum(axis=1)).ravel()
    return sparse.csr_matrix(sparse.diags(1.0 / counts) @ pattern, shape=(n, n), dtype=np.float32)


def _second_moments(adata: AnnData, genes: np.ndarray, weights: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``Mss = <s^2>`` and ``Mus = <s u>`` over each cell's neighbourhood for the chosen genes (float32)."""
    s, u = (adata.layers[name][:, genes] for name in (_keys.SPLICED, _keys.UNSPLICED))
    s, u = (sparse.csr_matrix(x.compute() if is_lazy(x) else x) for x in (s, u))
    mss = (weights @ s.multiply(s)).astype(np.float32)
    mus = (weights @ s.multiply(u)).astype(np.float32)
    return _dense(mss), _dense(mus)


def _quantile_fit(ms: np.ndarray, mu: np.ndarray, upper: float | None,
                  maxima: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The cells of each gene's extreme-quantile fit, and its ratio (float32)."""
    score_mask = _above(_quantile_score(ms, mu, maxima), upper) if upper is not None else np.ones(ms.shape, bool)
    work = np.result_type(ms, mu, np.float32)
    ratio = _slope(np.where(score_mask, ms, 0), np.where(score_mask, mu, 0), work).astype(np.float32)
    return score_mask, ratio


class QuantileFit:
    """Steps 1-2 (extreme-quantile ratio, its ``r2``, whether expressed) for every gene, added block by block."""

    def __init__(self, n_vars: int, perc: float | Sequence[float] | None = DEFAULT_PERC) -> None:
        self.upper = _upper_percentile(perc)
        self.ratio = np.empty(n_vars, np.float32)
        self.r2 = np.empty(n_vars)
        self.expressed = np.empty(n_vars, bool)

    @classmethod
    def over(cls, ms: Any, mu: Any, perc: float | Sequence[float] | None = DEFAULT_PERC,
             size: int | None = None) -> tuple[QuantileFit, np.ndarray | None]:  # fmt: skip
        """The fit of every gene of the layers ``ms`` and ``mu`` (in memory or lazy), read in their own precision
        in blocks of ``size`` genes (all at once when None); also the cells that the last block's fits used."""
        fit, score_mask = cls(ms.shape[1], perc), None
        for cols, (ms_b, mu_b) in column_blocks([ms, mu], np.arange(ms.shape[1]), size or ms.shape[1], dtype=None):
            score_mask = fit.add(cols, ms_b, mu_b)
        return fit, score_mask

    def add(self, cols: Any, ms: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """Fit the genes ``cols`` from their ``Ms`` and ``Mu`` over all cells; returns the cells each fit used."""
        maxima = ms.max(axis=0), mu.max(axis=0)
        score_mask, self.ratio[cols] = _quantile_fit(ms, mu, self.upper, maxima)
        self.r2[cols] = _r_squared(mu - self.ratio[cols] * ms, mu)
        # some positive value: the maximum is positive (a gene with NaN has ratio 0 and fails min_ratio anyway)
        self.expressed[cols] = (maxima[0] > 0) & (maxima[1] > 0)
        return score_mask


def _generalized_fit(adata: AnnData, genes: np.ndarray, weights: sparse.csr_matrix, ms: np.ndarray, mu: np.ndarray,
                     residual: np.ndarray, score_mask: np.ndarray, upper: float | None) -> np.ndarray:  # fmt: skip
    """The stochastic model's ``gamma`` of ``genes`` from their first moments and residuals (float32)."""
    mss, mus = _second_moments(adata, genes, weights)
    var_ss = 2 * mss - ms
    cov_us = 2 * mus + mu
    res2 = cov_us - _slope(var_ss, cov_us).astype(var_ss.dtype) * var_ss
    # first-order rows: cells in the quantile score's tail or in the upper tail of Ms itself
    first = score_mask | _above(ms, upper) if upper is not None else score_mask
    with np.errstate(divide="ignore", invalid="ignore"):
        sd1 = residual.std(axis=0).astype(np.float64)
        sd2 = res2.std(axis=0).astype(np.float64)
        x = np.vstack([first * ms / sd1, var_ss / sd2])
        y = np.vstack([first * mu / sd1, cov_us / sd2])
    return _slope(x, y).astype(np.float32)


def steady_state_inputs_missing(
    adata: AnnData, layers: Sequence[str] = (_keys.SPLICED, _keys.UNSPLICED)
) -> str | None:
    """What :func:`stochastic_velocity_genes` lacks among ``layers`` and the neighbour graph, in words; None
    when nothing. The default ``layers`` are those it needs beyond the smoothed ones."""
    missing = [f"layer '{n}'" for n in layers if n not in adata.layers]
    if _keys.CONNECTIVITIES not in adata.obsp:
        missing.append(f"obsp['{_keys.CONNECTIVITIES}']")
    return " and ".join(missing) or None


def _check_inputs(adata: AnnData, layers: Sequence[str]) -> Any:
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    missing = steady_state_inputs_missing(adata, layers)
    if missing:
        raise KeyError(
            f"{missing} missing: the steady-state fit needs the first moments, the normalised "
            f"'{_keys.SPLICED}'/'{_keys.UNSPLICED}' layers for the second moments and the neighbour graph they "
            "average over; run fluxvelo.pp.moments or fluxvelo.pp.recipe_flux first."
        )
    for name in layers:
        if adata.layers[name].shape != adata.shape:
            raise ValueError(f"layers['{name}'] has shape {adata.layers[name].shape}, expected {adata.shape}.")
    return in_memory(adata.obsp[_keys.CONNECTIVITIES])


def stochastic_velocity_genes(
    adata: AnnData,
    *,
    min_r2: float = 0.01,
    min_ratio: float = 0.01,
    perc: float | Sequence[float] | None = DEFAULT_PERC,
    use_highly_variable: bool = True,
    layer_spliced: str = _keys.MS,
    layer_unspliced: str = _keys.MU,
    generalized: bool = True,
    quantiles: QuantileFit | None = None,
) -> pd.DataFrame:
    """Velocity genes, ``gamma`` and ``r2`` of scVelo's stochastic steady-state model.

    Reproduces ``scvelo.tl.velocity(adata, mode='stochastic')`` (scVelo 0.3.x, no offsets, no groups)
    for the per-gene parameters: the extreme-quantile ratio, its ``r2``, the velocity-gene selection and
    the generalized least-squares ``gamma`` that also uses the second-order moments. Nothing is written
    into ``adata``.

    Parameters
    ----------
    adata
        Annotated data with the first moments (``layers[layer_spliced]``, ``layers[layer_unspliced]``),
        the normalised ``layers['spliced']`` and ``layers['unspliced']`` from which the second-order
        moments are computed, and the neighbour graph ``obsp['connectivities']``.
    min_r2
        Genes need ``r2`` above this.
    min_ratio
        Genes need the extreme-quantile ratio ``qreg_ratio`` above this.
    perc
        Percentiles of the extreme-quantile fit. As in scVelo without an offset, only the upper
        one of a pair is used: the fit keeps the cells at or above it. None fits on all cells.
    use_highly_variable
        Keep only genes with ``var['highly_variable']`` when that column exists. (scVelo's own
        ``tl.velocity`` applies the column whenever this argument is not None, so also for False.)
    layer_spliced, layer_unspliced
        Layers of the first moments ``Ms`` and ``Mu``.
    generalized
        Fit the generalized least-squares ``gamma`` (step 4). False skips it, and its second moments: ``gamma``
        is then the quantile ratio for every gene. The selection does not depend on it.
    quantiles
        Steps 1-2 already taken over every gene, with the same ``perc``: a pass over lazy layers that also
        serves another purpose (:func:`fluxvelo.tl.velocity`'s checks) then need not be repeated.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``adata.var_names``, with the columns

        - ``velocity_genes``: bool, scVelo's ``var['velocity_genes']``
        - ``gamma``: float32 degradation-to-splicing ratio, ``var['velocity_gamma']``; the stochastic
          fit for velocity genes (for all genes when none is selected), the quantile ratio otherwise
        - ``r2``: coefficient of determination of the quantile fit, ``var['velocity_r2']``
        - ``qreg_ratio``: float32 extreme-quantile ratio, ``var['velocity_qreg_ratio']``

    Raises
    ------
    KeyError
        When a layer or ``obsp['connectivities']`` is missing.
    ValueError
        When ``adata`` is empty, a layer has the wrong shape, or ``perc`` is not a percentile (pair).
    """
    graph = _check_inputs(adata, [layer_spliced, layer_unspliced, _keys.SPLICED, _keys.UNSPLICED])
    upper = _upper_percentile(perc)
    layers = adata.layers[layer_spliced], adata.layers[layer_unspliced]
    # every gene's fit is its own: lazy layers are read in blocks of genes, in-memory ones as they are
    lazy = any_lazy(*layers)
    size = gene_block_size(adata.n_obs, n_arrays=12) if lazy else adata.n_vars

    # 1-2. extreme-quantile ratio and its r2 over all cells
    score_mask = None  # in memory: one block, kept for step 4
    if quantiles is not None and quantiles.upper != upper:
        raise ValueError(f"quantiles were fitted with another perc than {perc!r}.")
    if quantiles is None:
        quantiles, score_mask = QuantileFit.over(*layers, perc, size)
        score_mask = None if lazy else score_mask
    qreg_ratio, r2, expressed = quantiles.ratio, quantiles.r2, quantiles.expressed

    # 3. selection
    genes = (r2 > min_r2) & (qreg_ratio > min_ratio) & expressed
    if use_highly_variable and "highly_variable" in adata.var:
        genes &= adata.var["highly_variable"].to_numpy(dtype=bool)
    if genes.sum() < 2:
        threshold = np.percentile(r2, _FALLBACK_PERCENTILE)
        genes = r2 > threshold
        logger.warning(
            "Low splicing signal: fewer than two genes pass min_r2/min_ratio; taking the genes with r2 > %.4g "
            "(the 80th percentile).",
            threshold,
        )

    # 4. generalized least squares on the selected genes (all genes when none is)
    if generalized:
        fit = genes if genes.any() else np.ones_like(genes)
    else:
        fit = np.zeros_like(genes)
    gamma = qreg_ratio.copy()
    weights = _averaging_operator(graph) if fit.any() else None
    for cols, (ms_f, mu_f) in column_blocks(list(layers), np.flatnonzero(fit), size, dtype=None):
        mask_f = _quantile_fit(ms_f, mu_f, upper)[0] if score_mask is None else score_mask[:, cols]
        residual = mu_f - qreg_ratio[cols] * ms_f
        gamma[cols] = _generalized_fit(adata, cols, weights, ms_f, mu_f, residual, mask_f, upper)

    return pd.DataFrame(
        {"velocity_genes": genes, "gamma": gamma, "r2": r2, "qreg_ratio": qreg_ratio},
        index=adata.var_names.copy(),
    )
