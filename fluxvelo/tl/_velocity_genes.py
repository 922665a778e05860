"""Which fitted genes the velocity graph uses (``var['velocity_genes']``)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from anndata import AnnData

from ._input import FitInput, gene_chunks
from ._steady_state import steady_state_inputs_missing, stochastic_velocity_genes

logger = logging.getLogger("fluxvelo")


def velocity_gene_criterion(adata: AnnData, opts: dict[str, Any]) -> str:
    """How ``var['velocity_genes']`` is chosen: ``'steady_state'``, ``'fit'`` or ``'all'`` (see the options).

    ``'auto'`` is ``'steady_state'`` where its inputs (the ``'spliced'``/``'unspliced'`` layers and the neighbour
    graph) are there, else ``'fit'``; ``min_r2=None`` keeps every fitted gene (``'all'``).
    """
    if opts["min_r2"] is None:
        return "all"
    if opts["velocity_genes"] != "auto":
        return opts["velocity_genes"]
    missing = steady_state_inputs_missing(adata)
    if missing:
        logger.info("velocity genes by the fitted line: scVelo's criterion needs %s", missing)
    return "fit" if missing else "steady_state"


def steady_state_table(adata: AnnData, inp: FitInput, opts: dict[str, Any], layers: tuple[str, str]):
    """scVelo's steady-state fit without its second moments (its velocity genes and extreme-quantile ratio per gene),
    where the velocity genes are scVelo's; else None."""
    if opts["velocity_genes"] != "steady_state":
        return None
    return stochastic_velocity_genes(adata, min_r2=opts["min_r2"], layer_spliced=layers[0],
                                     layer_unspliced=layers[1], generalized=False, quantiles=inp.quantiles)  # fmt: skip


def select_velocity_genes(inp: FitInput, rates: dict[str, np.ndarray], opts: dict[str, Any], table) -> np.ndarray:
    """Mask over ``var`` of the fitted genes that the velocity graph uses, by ``opts['velocity_genes']``.

    ``'steady_state'``: scVelo's criterion, which does not depend on the fit (the R^2 of its extreme-quantile
    steady-state line at least ``min_r2``; highly variable genes where marked; from :func:`steady_state_table`).
    ``'fit'``: the R^2 of the fitted ``ds/dt = 0`` line at least ``min_r2``. ``'all'``: every fitted gene.
    """
    selected = inp.genes.copy()
    if opts["velocity_genes"] == "all":
        return selected
    if opts["velocity_genes"] == "steady_state":
        return selected & table["velocity_genes"].to_numpy(bool)
    ratio = rates["gamma"] / rates["beta"]
    r2 = np.concatenate([_steady_state_r2(block, ratio[pos]) for pos, block in inp.gene_blocks()])
    selected[inp.genes] = r2 > opts["min_r2"]
    return selected


def _steady_state_r2(blocks: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """How well the field's ds/dt = 0 line ``u = ratio * s`` explains the cells: ``1 - SS_res / SS_tot`` of u.

    ``blocks`` are the scaled ``[genes, cells, 2]`` inputs; computed in chunks of genes.
    """
    r2 = np.empty(blocks.shape[0], np.float32)
    for g in gene_chunks(*blocks.shape[:2]):
        u, s = blocks[g, :, 0], blocks[g, :, 1]
        residual = ((u - ratio[g, None] * s) ** 2).sum(1)
        r2[g] = 1 - residual / ((u - u.mean(1, keepdims=True)) ** 2).sum(1)
    return r2
