"""The fit's input: the smoothed layers checked and laid out as the estimator's per-gene ``(u, s)`` blocks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from .._lazy import any_lazy, column_blocks, gene_block_size
from .._utils import to_dense
from ..fields import balance_moments
from ..pp._checks import check_finite, check_layers, check_nonempty, nonfinite_message
from ._steady_state import QuantileFit

logger = logging.getLogger("fluxvelo")

#: Fewer cells than this make a poor kernel estimate of the density; the fit runs, with a warning.
FEW_CELLS = 50
#: Fewest genes per block of the pass over lazy layers (see _scan_lazy).
SCAN_GENES = 16

NEGATIVE_MESSAGE = "Smoothed abundances must be non-negative; recompute them with fluxvelo.pp.moments."

# Cells per chunk when building the fit's input and evaluating the field: temporaries stay this size,
# so memory is the data, its [genes, cells, 2] copy and the output layers, plus a constant.
CELL_CHUNK = 4096


def cell_chunks(n_cells: int) -> Iterator[slice]:
    """Slices of :data:`CELL_CHUNK` cells covering ``n_cells`` (the setting is read when called)."""
    for start in range(0, n_cells, CELL_CHUNK):
        yield slice(start, start + CELL_CHUNK)


def gene_chunks(n_genes: int, n_cells: int) -> Iterator[slice]:
    """Slices of genes whose rows over ``n_cells`` together hold about as many values as 256 genes of a cell chunk."""
    step = max(1, (CELL_CHUNK * 256) // max(1, n_cells))
    for start in range(0, n_genes, step):
        yield slice(start, start + step)


def column_std(x: np.ndarray) -> np.ndarray:
    """Per-gene standard deviation, in cell chunks (float64 sums, two passes)."""
    n = x.shape[0]
    mean = np.zeros(x.shape[1])
    for cells in cell_chunks(n):
        mean += x[cells].sum(0, dtype=np.float64)
    mean /= n
    var = np.zeros(x.shape[1])
    for cells in cell_chunks(n):
        var += ((x[cells] - mean) ** 2).sum(0)
    return np.sqrt(var / n).astype(np.float32)


def scaled_blocks(
    u: np.ndarray, s: np.ndarray, idx: np.ndarray, scale_u: np.ndarray, scale_s: np.ndarray
) -> np.ndarray:
    """The fitted genes as the estimator's blocks ``[genes, cells, 2]`` of scaled ``(u, s)``, in cell chunks."""
    out = np.empty((idx.size, u.shape[0], 2), np.float32)
    for cells in cell_chunks(u.shape[0]):
        out[:, cells, 0] = (u[cells][:, idx] / scale_u).T
        out[:, cells, 1] = (s[cells][:, idx] / scale_s).T
    return out


@dataclass
class FitInput:
    """The fitted genes as the estimator sees them.

    Attributes
    ----------
    genes
        Mask over ``var`` of the genes that vary in both layers (the fitted ones).
    idx
        Their positions.
    scale_u, scale_s
        Per-gene scales that divide ``u`` and ``s`` before the fit.
    unspliced, spliced
        The layers as given: in memory, or lazy (Dask).
    blocks
        Scaled ``(u, s)`` of every cell laid out ``[genes, cells, 2]``; None for lazy layers, which are read
        in blocks of genes (:meth:`gene_blocks`).
    rows, moments, quantiles
        Lazy layers only, gathered by the pass that checked them: the scaled ``[genes, cells, 2]`` of the
        cells the fit sees, the balance moments (None without turnover) and scVelo's quantile fit (None when
        its velocity genes are not used).
    """

    genes: np.ndarray
    idx: np.ndarray
    scale_u: np.ndarray
    scale_s: np.ndarray
    unspliced: Any
    spliced: Any
    blocks: np.ndarray | None
    rows: np.ndarray | None = None
    moments: dict[str, torch.Tensor] | None = None
    quantiles: QuantileFit | None = None

    @property
    def lazy(self) -> bool:
        return self.blocks is None

    def gene_blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(positions among the fitted genes, their scaled ``[genes, cells, 2]`` of every cell), block by block."""
        if self.blocks is not None:
            yield slice(0, self.idx.size), self.blocks
            return
        size = gene_block_size(self.spliced.shape[0], n_arrays=6)
        start = 0
        for block, (u, s) in column_blocks([self.unspliced, self.spliced], self.idx, size):
            pos = slice(start, start + block.size)
            start += block.size
            yield pos, scaled_blocks(u, s, np.arange(u.shape[1]), self.scale_u[pos], self.scale_s[pos])

    @property
    def fit_data(self) -> np.ndarray:
        """Scaled ``[genes, cells, 2]`` of the cells the fit sees: every cell in memory, else :attr:`rows`."""
        return self.rows if self.blocks is None else self.blocks


def build_input(
    adata: AnnData,
    layer_spliced: str,
    layer_unspliced: str,
    gene_scale: float | None,
    *,
    cells: np.ndarray | None = None,
    turnover: np.ndarray | None = None,
    quantiles: bool = False,
) -> FitInput:
    """Check the smoothed layers and lay the genes that vary in both out as the estimator's blocks.

    Lazy (Dask) layers are not laid out. One pass over them, in blocks of genes over all cells, checks and
    scales them and gathers what the fit needs before it starts: the rows of its ``cells``, the balance moments
    with ``turnover`` where given, and scVelo's quantile fit where ``quantiles`` (for its velocity genes).
    """
    check_nonempty(adata)
    check_layers(
        adata, [layer_spliced, layer_unspliced], hint="run fluxvelo.pp.moments(adata) (or the preprocessing recipe) first."
    )
    if adata.n_obs < 3:
        raise ValueError(f"Too few cells ({adata.n_obs}) to fit a velocity field; at least 3 are needed.")
    s_all, u_all = adata.layers[layer_spliced], adata.layers[layer_unspliced]
    if any_lazy(s_all, u_all):
        cells = np.arange(adata.n_obs) if cells is None else cells
        inp = _scan_lazy(adata, (layer_spliced, layer_unspliced), gene_scale, cells, turnover, quantiles)
    else:
        check_finite(adata, [layer_spliced, layer_unspliced])
        # no copy when the layers are dense float32 already
        s_all = np.asarray(to_dense(s_all), dtype=np.float32)
        u_all = np.asarray(to_dense(u_all), dtype=np.float32)
        if (s_all < 0).any() or (u_all < 0).any():
            raise ValueError(NEGATIVE_MESSAGE)
        idx, scale_u, scale_s = _fitted_genes(column_std(u_all), column_std(s_all), gene_scale)
        blocks = scaled_blocks(u_all, s_all, idx, scale_u, scale_s)
        inp = FitInput(_mask(idx, adata.n_vars), idx, scale_u, scale_s, u_all, s_all, blocks)
    if adata.n_obs < FEW_CELLS:
        logger.warning(
            "only %d cells: the kernel estimate of their density is poor, so the fitted velocities are unreliable",
            adata.n_obs,
        )
    return inp


def _fitted_genes(
    std_u: np.ndarray, std_s: np.ndarray, gene_scale: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the genes with signal in both layers (the others are not fitted), and their scales."""
    idx = np.flatnonzero((std_u > 0) & (std_s > 0))
    scale_u = std_u[idx] / gene_scale if gene_scale else np.ones(idx.size, np.float32)
    scale_s = std_s[idx] / gene_scale if gene_scale else np.ones(idx.size, np.float32)
    return idx, scale_u, scale_s


def _mask(idx: np.ndarray, n_vars: int) -> np.ndarray:
    """Mask over ``var`` of the fitted genes ``idx``; an error when there are none."""
    if not idx.size:
        raise ValueError("No gene varies in both spliced and unspliced abundance; nothing to fit.")
    mask = np.zeros(n_vars, bool)
    mask[idx] = True
    return mask


def _scan_lazy(adata: AnnData, layers: tuple[str, str], gene_scale: float | None, cells: np.ndarray,
               turnover: np.ndarray | None, quantiles: bool) -> FitInput:  # fmt: skip
    """:func:`build_input` for lazy layers: everything the fit needs first, from one read of each block of genes.

    Each statistic is a reduction over the cells of one gene, so it comes out as the in-memory path computes
    it. The checks raise on the first block that fails, before anything is written.
    """
    s_all, u_all = adata.layers[layers[0]], adata.layers[layers[1]]
    g = None if turnover is None else torch.from_numpy(np.asarray(turnover))
    quantile_fit = QuantileFit(adata.n_vars) if quantiles else None
    idx, scale_u, scale_s, rows, moments = [], [], [], [], []
    # at least SCAN_GENES per block: per-gene reductions over a few columns of a million rows cost several times
    # more per value than over a few dozen (docs/scale.md); 16 genes of a million cells are 64 MB per array
    size = max(gene_block_size(adata.n_obs, n_arrays=12), SCAN_GENES)
    for block, (u, s) in column_blocks([u_all, s_all], np.arange(adata.n_vars), size, dtype=None):
        for x, name in ((u, layers[1]), (s, layers[0])):
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            if bad:
                raise ValueError(nonfinite_message(name, bad))
            if (x < 0).any():
                raise ValueError(NEGATIVE_MESSAGE)
        if quantile_fit is not None:  # scVelo's fit reads the layers in their own precision
            quantile_fit.add(block, s, u)
        u, s = np.asarray(u, np.float32), np.asarray(s, np.float32)
        local, su, ss = _fitted_genes(column_std(u), column_std(s), gene_scale)
        if not local.size:
            continue
        idx.append(block[local])
        scale_u.append(su)
        scale_s.append(ss)
        rows.append(scaled_blocks(u[cells], s[cells], local, su, ss))
        if g is not None:
            moments.append(balance_moments(torch.from_numpy(scaled_blocks(u, s, local, su, ss)), g))
    idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    inp = FitInput(_mask(idx, adata.n_vars), idx, np.concatenate(scale_u), np.concatenate(scale_s), u_all, s_all,
                   None, rows=np.concatenate(rows), quantiles=quantile_fit)  # fmt: skip
    if moments:
        inp.moments = {k: torch.cat([m[k] for m in moments]) for k in moments[0]}
    return inp


def data_moments(inp: FitInput, data: torch.Tensor, turnover: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """:func:`fluxvelo.fields.balance_moments` over every cell: of ``data`` in memory, from the pass over lazy
    layers (:func:`build_input`) otherwise."""
    if not inp.lazy:
        return balance_moments(data, turnover)
    return {k: v.to(data.device) for k, v in inp.moments.items()}
