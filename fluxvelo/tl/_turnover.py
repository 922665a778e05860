"""Turnover sources for population-balance velocity: where cells are born (``g > 0``) and where they leave.

A developing tissue is stationary only with cells coming in and going out. With a turnover rate ``g`` per
cell, the Flux Matching fit asks for ``-div(p f) + lap p + g p = 0`` instead of strict stationarity, and the
field then carries a net flow from where cells are born to where they leave (FLUX_MATCHING.md, "population
balance"). This module turns a source (an ``obs`` column, a per-cell array, or a named score computed from
expression) into the rates the estimator takes. Sources never come from cluster labels or lineage edges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

logger = logging.getLogger("fluxvelo")

# Cell-cycle marker genes of Tirosh et al. (Science 2016), S and G2/M phases, in human nomenclature; matched
# case-insensitively, so mouse symbols (Top2a, Mki67) match too. Older and newer symbols both listed.
CELL_CYCLE_GENES = (
    # S phase
    "MCM5 PCNA TYMS FEN1 MCM2 MCM4 RRM1 UNG GINS2 MCM6 CDCA7 DTL PRIM1 UHRF1 MLF1IP CENPU HELLS RFC2 RPA2 NASP "
    "RAD51AP1 GMNN WDR76 SLBP CCNE2 UBR7 POLD3 MSH2 ATAD2 RAD51 RRM2 CDC45 CDC6 EXO1 TIPIN DSCC1 BLM CASP8AP2 "
    "USP1 CLSPN POLA1 CHAF1B BRIP1 E2F8 "
    # G2/M phase
    "HMGB2 CDK1 NUSAP1 UBE2C BIRC5 TPX2 TOP2A NDC80 CKS2 NUF2 CKS1B MKI67 TMPO CENPF TACC3 FAM64A PIMREG SMC4 "
    "CCNB2 CKAP2L CKAP2 AURKB BUB1 KIF11 ANP32E TUBB4B GTSE1 KIF20B HJURP CDCA3 HN1 JPT1 CDC20 TTK CDC25C KIF2C "
    "RANGAP1 NCAPD2 DLGAP5 CDCA2 CDCA8 ECT2 KIF23 HMMR AURKA PSRC1 ANLN LBR CKAP5 CENPE CTCF NEK2 G2E3 GAS2L3 "
    "CBX5 CENPA"
).split()
MIN_CELL_CYCLE_GENES = 5


def _cell_cycle_positions(adata: AnnData) -> np.ndarray:
    """Positions in ``var_names`` of the genes of :data:`CELL_CYCLE_GENES` (case-insensitive)."""
    wanted = {g.upper() for g in CELL_CYCLE_GENES}
    return np.flatnonzero([name.upper() in wanted for name in adata.var_names])


def cell_cycle_score(adata: AnnData, *, layer: str | None = None) -> np.ndarray:
    """Proliferation score per cell: the mean standardised expression of the cell-cycle genes present.

    Each marker gene found in ``adata.var_names`` (case-insensitive) is standardised over cells, and the score
    is their mean; cycling cells score high. It reads X (log-normalised after :func:`fluxvelo.pp.recipe_flux`)
    or ``layers[layer]``.
    """
    found = _cell_cycle_positions(adata)
    if found.size < MIN_CELL_CYCLE_GENES:
        raise ValueError(
            f"turnover='cell_cycle' found {found.size} cell-cycle marker genes in adata.var_names (need at least "
            f"{MIN_CELL_CYCLE_GENES}); keep them through gene selection, or name an obs column with a "
            "proliferation score instead (turnover='<column>')."
        )
    x = adata.X if layer is None else adata.layers[layer]
    x = x[:, found]
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    std = x.std(0)
    x = (x[:, std > 0] - x[:, std > 0].mean(0)) / std[std > 0]
    logger.info("turnover: cell-cycle score from %d marker genes", int((std > 0).sum()))
    return x.mean(1)


#: Named turnover sources: a function of the AnnData returning one raw score per cell.
TURNOVER_SOURCES: dict[str, Callable[[AnnData], np.ndarray]] = {"cell_cycle": cell_cycle_score}


def resolve_source(adata: AnnData, source: str | Sequence[float] | np.ndarray | None) -> Any:
    """``'auto'`` becomes ``'cell_cycle'`` where enough cell-cycle markers are in ``var_names``, else None."""
    if not (isinstance(source, str) and source == "auto"):
        return source
    found = _cell_cycle_positions(adata).size
    if found >= MIN_CELL_CYCLE_GENES:
        return "cell_cycle"
    logger.info(
        "turnover='auto': %d cell-cycle marker genes found (fewer than %d), so no turnover is used",
        found, MIN_CELL_CYCLE_GENES,
    )  # fmt: skip
    return None


def turnover_rates(adata: AnnData, source: str | Sequence[float] | np.ndarray | None, *, rate: float) -> np.ndarray | None:
    """Per-cell turnover rates for the fit: the source's score, centred and scaled to standard deviation ``rate``.

    Centring makes births balance losses over the data, as a stationary population needs. ``rate`` is in the
    fit's time unit (unit diffusion in the rescaled coordinates).

    Parameters
    ----------
    adata
        The data being fitted.
    source
        None (no turnover), a name in :data:`TURNOVER_SOURCES` (``'cell_cycle'``), an ``obs`` column with a
        numeric score (higher = more births), or one value per cell.
    rate
        Standard deviation of the returned rates.

    Returns
    -------
    ``float32`` array of length ``n_obs`` with mean 0, or None for no turnover.
    """
    if source is None:
        return None
    if isinstance(source, str):
        if source in TURNOVER_SOURCES:
            raw = TURNOVER_SOURCES[source](adata)
        elif source in adata.obs:
            column = adata.obs[source]
            if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
                raise TypeError(f"turnover column obs[{source!r}] must be numeric (a score per cell), not {column.dtype}.")
            raw = column.to_numpy(np.float64)
        else:
            raise KeyError(
                f"turnover={source!r} is neither a turnover source {sorted(TURNOVER_SOURCES)} nor an obs column "
                f"(obs has {list(adata.obs.columns)[:10]}...)."
            )
    else:
        raw = np.asarray(source, dtype=np.float64).ravel()
        if raw.size != adata.n_obs:
            raise ValueError(f"turnover has {raw.size} values; one per cell ({adata.n_obs}) is needed.")
    if not np.isfinite(raw).all():
        raise ValueError("turnover has NaN or infinite values; fill or drop those cells first.")
    spread = raw.std()
    if spread == 0:
        raise ValueError("turnover is the same for every cell; it carries no births or losses (use turnover=None).")
    if rate < 0:
        raise ValueError(f"turnover_rate must be non-negative, got {rate}.")
    return ((raw - raw.mean()) / spread * rate).astype(np.float32)
