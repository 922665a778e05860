"""``fv.tl.velocity``: fit the gene-local kinetic field with Flux Matching and write velocities."""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from .. import __version__
from .. import _keys as keys
from .._jit import compile_fit_kernels_ahead
from .._lazy import any_lazy, column_blocks, gene_block_size, release_memory
from .._threads import cpu_threads
from .._utils import make_generators, resolve_device, save_many, to_dense
from ..fields import FIELDS, balance_moments, moment_rates
from ..pp._checks import check_finite, check_layers, check_nonempty, nonfinite_message
from ._fit import BatchPlan, FitResult, fit_field
from ._states import STATE_RANK, low_rank_states
from ._steady_state import QuantileFit, steady_state_inputs_missing, stochastic_velocity_genes
from ._turnover import resolve_source, turnover_rates

logger = logging.getLogger("fluxvelo")

#: Standard deviation of the turnover rates, in the fit's time unit at gene_scale 10: the splicing rate at the
#: balanced start (1 / Var(u) = 0.01 there). Chosen on two simulators of different design, for a score from five
#: noisy marker genes as turnover='auto' reads it (docs/diagnosis.md, "The turnover from a few marker genes").
TURNOVER_RATE = 0.01
#: The gene_scale at which turnover_rate is given (see turnover_std).
TURNOVER_GENE_SCALE = 10.0

#: How far each gene's clock is pulled toward one shared by all genes (``shared_clock``), chosen on three
#: simulators (docs/diagnosis.md, "Each gene's clock, pulled toward a shared one").
SHARED_CLOCK = 0.25
#: How far each gene's ratio ``gamma' = gamma / beta`` is pulled, in log, toward scVelo's steady-state ratio
#: (``steady_state_ratio``), chosen on three simulators (docs/diagnosis.md, "Each gene's ratio, pulled toward the
#: steady state").
STEADY_STATE_RATIO = 0.25

#: Settings per preset. 'paper' is the reference estimator's training (FLUX_MATCHING.md).
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        sigma2=4.0,
        epochs=None,
        n_steps=120,
        batch_size=64,
        lr=2e-2,
        gene_scale=10.0,
        min_r2=0.01,
        velocity_genes="auto",
        time_unit="splicing",
        loss_scale=None,
        turnover="auto",
        turnover_rate=TURNOVER_RATE,
        balance="auto",
        remainder="spread",
        sqrt_transform=False,
        state_rank="auto",
        shared_clock=SHARED_CLOCK,
        steady_state_ratio=STEADY_STATE_RATIO,
    ),
    "paper": dict(
        sigma2=1e-3,
        epochs=100,
        n_steps=None,
        batch_size=256,
        lr=1e-3,
        gene_scale=None,
        min_r2=0.01,
        velocity_genes="steady_state",  # the paper's velocity graph uses scVelo's stochastic velocity genes
        time_unit="diffusion",
        loss_scale="sigma4",
        turnover=None,
        turnover_rate=TURNOVER_RATE,
        balance=False,
        remainder="last",  # torch's DataLoader: a smaller last batch, 15 steps per epoch on pancreas
        # The paper's pipeline runs scVelo's stochastic model first and keeps its uns['velocity_params'], so
        # scVelo's velocity_graph takes the square root of the flux velocities (its rule for mode 'stochastic').
        sqrt_transform=True,
        state_rank=None,
        shared_clock=None,
        steady_state_ratio=None,
    ),
}

#: Options that ``False`` switches off (stored as None).
_SWITCHABLE = ("gene_scale", "min_r2", "turnover", "state_rank", "shared_clock", "steady_state_ratio")
#: Fewer cells than this make a poor kernel estimate of the density; the fit runs, with a warning.
FEW_CELLS = 50


#: Fewest genes per block of the pass over lazy layers (see _scan_lazy).
SCAN_GENES = 16

NEGATIVE_MESSAGE = "Smoothed abundances must be non-negative; recompute them with fluxvelo.pp.moments."

# Cells per chunk when building the fit's input and evaluating the field: temporaries stay this size,
# so memory is the data, its [genes, cells, 2] copy and the output layers, plus a constant.
CELL_CHUNK = 4096


def _column_std(x: np.ndarray) -> np.ndarray:
    """Per-gene standard deviation, in cell chunks (float64 sums, two passes)."""
    n = x.shape[0]
    mean = np.zeros(x.shape[1])
    for start in range(0, n, CELL_CHUNK):
        mean += x[start : start + CELL_CHUNK].sum(0, dtype=np.float64)
    mean /= n
    var = np.zeros(x.shape[1])
    for start in range(0, n, CELL_CHUNK):
        var += ((x[start : start + CELL_CHUNK] - mean) ** 2).sum(0)
    return np.sqrt(var / n).astype(np.float32)


def _blocks(u: np.ndarray, s: np.ndarray, idx: np.ndarray, scale_u: np.ndarray, scale_s: np.ndarray) -> np.ndarray:
    """The fitted genes as the estimator's blocks ``[genes, cells, 2]`` of scaled ``(u, s)``, in cell chunks."""
    out = np.empty((idx.size, u.shape[0], 2), np.float32)
    for start in range(0, u.shape[0], CELL_CHUNK):
        cells = slice(start, start + CELL_CHUNK)
        out[:, cells, 0] = (u[cells][:, idx] / scale_u).T
        out[:, cells, 1] = (s[cells][:, idx] / scale_s).T
    return out


def _steady_state_r2(blocks: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """How well the field's ds/dt = 0 line ``u = ratio * s`` explains the cells: ``1 - SS_res / SS_tot`` of u.

    ``blocks`` are the scaled ``[genes, cells, 2]`` inputs; computed in chunks of genes.
    """
    r2 = np.empty(blocks.shape[0], np.float32)
    step = max(1, (CELL_CHUNK * 256) // max(1, blocks.shape[1]))
    for start in range(0, blocks.shape[0], step):
        g = slice(start, start + step)
        u, s = blocks[g, :, 0], blocks[g, :, 1]
        residual = ((u - ratio[g, None] * s) ** 2).sum(1)
        r2[g] = 1 - residual / ((u - u.mean(1, keepdims=True)) ** 2).sum(1)
    return r2


def turnover_std(rate: float, gene_scale: float | None) -> float:
    """The turnover rates' standard deviation in the fit's time unit, for ``turnover_rate=rate``.

    With unit diffusion, a gene rescaled to standard deviation ``gene_scale`` relaxes at rates of order
    ``1 / gene_scale^2`` (the balanced start's splicing rate is ``1 / Var(u)``). ``rate`` is given at
    :data:`TURNOVER_GENE_SCALE` and scaled by ``(TURNOVER_GENE_SCALE / gene_scale)^2``, so that it keeps its size
    against the splicing rate at every scale (at gene_scale 30 the unscaled rate was nine times stronger and
    the fit collapsed on the growth simulation). Without rescaling (``gene_scale`` None) it is used as given.
    """
    return rate if not gene_scale else rate * (TURNOVER_GENE_SCALE / gene_scale) ** 2


def resolve_options(preset: str, **explicit: Any) -> dict[str, Any]:
    """The preset's settings with every explicit option that is not None on top; False switches an option off.

    ``epochs`` and ``n_steps`` go together: giving either replaces both of the preset's.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    opts = dict(PRESETS[preset])
    if explicit.get("epochs") is not None or explicit.get("n_steps") is not None:
        opts["epochs"], opts["n_steps"] = explicit.pop("epochs"), explicit.pop("n_steps")
    for name, value in explicit.items():
        if value is not None:
            opts[name] = None if (value is False and name in _SWITCHABLE) else value
    for name in ("gene_scale", "min_r2", "sigma2", "lr", "turnover_rate", "shared_clock", "steady_state_ratio"):
        if opts.get(name) is not None:
            opts[name] = float(opts[name])
    for name in ("shared_clock", "steady_state_ratio"):
        if opts[name] is not None and not 0 <= opts[name] <= 1:
            raise ValueError(f"{name} must lie between 0 and 1 (or be False), got {opts[name]}.")
    if opts["time_unit"] not in ("splicing", "diffusion"):
        raise ValueError(f"Unknown time_unit {opts['time_unit']!r}; use 'splicing' or 'diffusion'.")
    if opts["balance"] not in ("auto", True, False):
        raise ValueError(f"balance must be 'auto', True or False, got {opts['balance']!r}.")
    rank = opts["state_rank"]
    if rank not in (None, "auto") and (isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1):
        raise ValueError(f"state_rank must be a positive number of axes, 'auto' or False, got {rank!r}.")
    if opts["velocity_genes"] not in ("auto", "steady_state", "fit"):
        raise ValueError(f"Unknown velocity_genes {opts['velocity_genes']!r}; use 'auto', 'steady_state' or 'fit'.")
    if opts["epochs"] is None and opts["n_steps"] is None:
        raise ValueError("Give epochs or n_steps.")
    if (opts["epochs"] or 1) < 1 or (opts["n_steps"] or 1) < 1:
        raise ValueError("epochs and n_steps must be at least 1.")
    if opts["sigma2"] <= 0 or opts["batch_size"] < 2 or opts["lr"] <= 0:
        raise ValueError("sigma2 and lr must be positive and batch_size at least 2.")
    return opts


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
            yield pos, _blocks(u, s, np.arange(u.shape[1]), self.scale_u[pos], self.scale_s[pos])

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
        idx, scale_u, scale_s = _fitted_genes(_column_std(u_all), _column_std(s_all), gene_scale)
        blocks = _blocks(u_all, s_all, idx, scale_u, scale_s)
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
        local, su, ss = _fitted_genes(_column_std(u), _column_std(s), gene_scale)
        if not local.size:
            continue
        idx.append(block[local])
        scale_u.append(su)
        scale_s.append(ss)
        rows.append(_blocks(u[cells], s[cells], local, su, ss))
        if g is not None:
            moments.append(balance_moments(torch.from_numpy(_blocks(u, s, local, su, ss)), g))
    idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    inp = FitInput(_mask(idx, adata.n_vars), idx, np.concatenate(scale_u), np.concatenate(scale_s), u_all, s_all,
                   None, rows=np.concatenate(rows), quantiles=quantile_fit)  # fmt: skip
    if moments:
        inp.moments = {k: torch.cat([m[k] for m in moments]) for k in moments[0]}
    return inp


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


def steady_state_ratios(adata: AnnData, inp: FitInput, table, layers: tuple[str, str]) -> np.ndarray:
    """scVelo's extreme-quantile ratio ``Mu / Ms`` of each fitted gene: from ``table`` or the lazy input's pass where
    they hold it, else fitted here from the smoothed layers alone."""
    if table is not None:
        return table["qreg_ratio"].to_numpy()[inp.genes]
    if inp.quantiles is not None:
        return inp.quantiles.ratio[inp.genes]
    fit, _ = QuantileFit.over(*(adata.layers[name] for name in layers))  # as the table's fit reads them
    return fit.ratio[inp.genes]


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


def steady_state_gamma(rates: dict[str, np.ndarray], inp: FitInput, ratio: np.ndarray, weight: float) -> np.ndarray:
    """``gamma`` whose ratio to ``beta`` is the fitted one pulled, in log, toward the steady-state ``ratio`` (per
    fitted gene, in original units: ``Mu = ratio Ms`` on the steady-state line) by ``weight`` in [0, 1]. Genes where
    either ratio is not positive keep their fitted ``gamma``."""
    fitted = rates["gamma"].astype(np.float64) / rates["beta"]
    steady = np.asarray(ratio, np.float64) * inp.scale_s / inp.scale_u  # the same line in the fit's coordinates
    usable = np.isfinite(steady) & (steady > 0) & (fitted > 0)
    pooled = fitted ** (1 - weight) * np.where(usable, steady, fitted) ** weight
    return (rates["beta"] * np.where(usable, pooled, fitted)).astype(np.float32)


def build_field(field: str, n_genes: int, device: torch.device, moments: dict[str, torch.Tensor] | None, *,
                unit: float) -> torch.nn.Module:  # fmt: skip
    """The field to fit: the paper's start (every raw parameter 0), or the balanced one given the data's moments.

    Balanced: started at the moment balance of the constant-drive field, ``gamma`` held to the spliced balance
    and the drive's inputs centred in units of ``unit`` (docs/diagnosis.md, "A fit that holds its balance").
    """
    model = FIELDS[field](n_genes).to(device)
    if moments is not None:
        model.start_at(moment_rates(moments))
        model.hold_balance(moments)
        model.centre_drive(moments, unit)
    return model


def data_moments(inp: FitInput, data: torch.Tensor, turnover: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """:func:`fluxvelo.fields.balance_moments` over every cell: of ``data`` in memory, from the pass over lazy
    layers (:func:`build_input`) otherwise."""
    if not inp.lazy:
        return balance_moments(data, turnover)
    return {k: v.to(data.device) for k, v in inp.moments.items()}


@dataclass
class FieldValues:
    """The fitted field over all cells, in original units; per gene its stationarity, the factor to the velocities'
    time unit and the ``gamma`` they are read with."""

    velocity: np.ndarray
    velocity_u: np.ndarray
    drive: np.ndarray
    stationarity: np.ndarray
    time_scale: np.ndarray
    gamma: np.ndarray


def evaluate_field(model: torch.nn.Module, data: torch.Tensor, inp: FitInput, time_scale: np.ndarray,
                   n_vars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Spliced and unspliced velocity and drive at every cell, in cell chunks (lazy inputs: :func:`evaluate_lazy`)."""
    n_obs = data.shape[1]
    idx = inp.idx
    velocity_s = np.full((n_obs, n_vars), np.nan, np.float32)
    velocity_u = np.full((n_obs, n_vars), np.nan, np.float32)
    drive = np.full((n_obs, n_vars), np.nan, np.float32)
    with torch.no_grad():
        for start in range(0, n_obs, CELL_CHUNK):
            cells = slice(start, start + CELL_CHUNK)
            x = data[:, cells]
            flow = model(x).cpu().numpy()  # [genes, chunk, 2] in scaled units
            velocity_s[cells, idx] = flow[..., 1].T * (inp.scale_s * time_scale)
            velocity_u[cells, idx] = flow[..., 0].T * (inp.scale_u * time_scale)
            drive[cells, idx] = model.drive(x).cpu().numpy().T * (inp.scale_u * time_scale)
    return velocity_s, velocity_u, drive


def pooled_time_scale(model: torch.nn.Module, states: torch.Tensor, inp: FitInput, time_scale: np.ndarray,
                      pooling: float) -> np.ndarray:  # fmt: skip
    """Each gene's time unit pulled toward a clock shared by all genes: ``time_scale^(1 - pooling) * shared^pooling``.

    ``shared`` is the unit in which a gene's spliced velocity, read at ``states``, spreads over the cells as much as
    its spliced abundance does: a clock under which every gene crosses its range at the same pace, as when all
    genes follow one lineage time. Spreads are standard deviations over the cells (the abundance's over the cells
    the fit sees, as given).
    """
    n = states.shape[1]
    total = np.zeros(states.shape[0])
    squares = np.zeros(states.shape[0])
    with torch.no_grad():
        for start in range(0, n, CELL_CHUNK):
            flow_s = model(states[:, start : start + CELL_CHUNK])[..., 1].double().cpu().numpy()
            total += flow_s.sum(1)
            squares += (flow_s**2).sum(1)
    flow_std = np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0))
    spliced_std = _column_std(inp.fit_data[..., 1].T).astype(np.float64)
    # a gene whose velocity does not vary has no shared pace: it keeps its own clock
    shared = np.divide(spliced_std, flow_std, out=time_scale.astype(np.float64), where=flow_std > 0)
    return (time_scale ** (1 - pooling) * shared**pooling).astype(np.float32)


def resolve_state_rank(rank: int | str | None, inp: FitInput) -> int | None:
    """The principal axes of the states where the field is read: ``'auto'`` is :data:`STATE_RANK` for layers in
    memory and None (the smoothed states as given) for lazy ones, where an explicit rank is an error."""
    if rank == "auto":
        return None if inp.lazy else STATE_RANK
    if rank is not None and inp.lazy:
        raise ValueError(
            f"state_rank={rank} needs the smoothed layers in memory; load them (adata.layers[...] = "
            "adata.layers[...].compute()) or pass state_rank=False."
        )
    return None if rank is None else int(rank)


def stationarity(model: torch.nn.Module, seen: torch.Tensor, turnover: np.ndarray | None) -> np.ndarray:
    """How far the fit is from the balance it was asked for, per gene, over the cells it saw (``seen``).

    ``|E[f] + E[x g]| / E[|f|]`` in the fit's coordinates: under drift, unit diffusion and turnover ``g`` (mean 0
    over all cells) the field's mean over the data is ``-E[x g]`` (zero without turnover), so 0 is a fit that
    reaches its balance and values near 1 are a field whose mean is as large as the field itself. The cells the
    fit saw are every cell once it runs an epoch or more, else a uniform draw of them; the same cells whether
    the layers are in memory or lazy, so that lazy layers need no pass over every cell for it.
    """
    n = seen.shape[1]
    sum_f = torch.zeros((seen.shape[0], 2), dtype=torch.float64)
    sum_norm = torch.zeros(seen.shape[0], dtype=torch.float64)
    sum_xg = torch.zeros_like(sum_f)
    with torch.no_grad():
        for start in range(0, n, CELL_CHUNK):
            cells = slice(start, start + CELL_CHUNK)
            x = seen[:, cells]
            flow = model(x)
            sum_f += flow.sum(1, dtype=torch.float64).cpu()
            sum_norm += torch.linalg.vector_norm(flow, dim=-1).sum(1, dtype=torch.float64).cpu()
            if turnover is not None:
                g = torch.as_tensor(turnover[cells], dtype=x.dtype, device=x.device)
                sum_xg += torch.einsum("gcd,c->gd", x, g).double().cpu()
    balance = torch.linalg.vector_norm(sum_f + sum_xg, dim=-1) / torch.clamp(sum_norm, min=1e-30)
    return balance.numpy().astype(np.float32)


class FieldOnChunks:
    """One output of the fitted field (``'velocity'``, ``'velocity_u'`` or ``'drive'``) on a chunk of lazy layers.

    Called by :func:`dask.array.map_blocks` with matching chunks of the unspliced and spliced layers; genes that
    were not fitted are NaN. The field is gene-local, so each chunk needs only its own genes' parameters.
    """

    def __init__(self, model: torch.nn.Module, inp: FitInput, time_scale: np.ndarray, n_vars: int, output: str):
        self.model = copy.deepcopy(model).cpu()
        self.position = np.full(n_vars, -1)
        self.position[inp.idx] = np.arange(inp.idx.size)
        self.scale_u, self.scale_s, self.time_scale, self.output = inp.scale_u, inp.scale_s, time_scale, output

    def __call__(self, u: np.ndarray, s: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        start, stop = block_info[0]["array-location"][1]
        local = np.flatnonzero(self.position[start:stop] >= 0)
        pos = self.position[start:stop][local]
        out = np.full(u.shape, np.nan, np.float32)
        if pos.size:
            x = torch.from_numpy(_blocks(np.asarray(u, np.float32), np.asarray(s, np.float32), local,
                                         self.scale_u[pos], self.scale_s[pos]))  # fmt: skip
            field = self.model.take(pos)
            with torch.no_grad():
                if self.output == "drive":
                    out[:, local] = field.drive(x).numpy().T * (self.scale_u[pos] * self.time_scale[pos])
                else:
                    dim, scale = (1, self.scale_s) if self.output == "velocity" else (0, self.scale_u)
                    out[:, local] = field(x)[..., dim].numpy().T * (scale[pos] * self.time_scale[pos])
        return out


def evaluate_lazy(model: torch.nn.Module, inp: FitInput, time_scale: np.ndarray, n_vars: int) -> tuple[Any, Any, Any]:
    """:func:`evaluate_field` for lazy layers: Dask arrays with the unspliced layer's chunks, computed when read."""
    import dask.array as da

    u = da.asarray(inp.unspliced)
    s = da.asarray(inp.spliced).rechunk(u.chunks)
    return tuple(
        da.map_blocks(FieldOnChunks(model, inp, time_scale, n_vars, name), u, s, dtype=np.float32,
                      meta=np.empty((0, 0), np.float32), name=f"fluxvelo-{name}-{uuid.uuid4().hex}")
        for name in ("velocity", "velocity_u", "drive")
    )  # fmt: skip


def velocity(
    adata: AnnData,
    *,
    preset: str = "default",
    field: str = "kinetic",
    turnover: str | np.ndarray | bool | None = None,
    turnover_rate: float | None = None,
    sigma2: float | None = None,
    epochs: int | None = None,
    n_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    horizon: float = 4.0,
    n_substeps: int = 4,
    gene_scale: float | bool | None = None,
    min_r2: float | bool | None = None,
    time_unit: str | None = None,
    balance: bool | str | None = None,
    velocity_genes: str | None = None,
    state_rank: int | str | bool | None = None,
    shared_clock: float | bool | None = None,
    steady_state_ratio: float | bool | None = None,
    layer_spliced: str = keys.MS,
    layer_unspliced: str = keys.MU,
    key_added: str = keys.VELOCITY,
    random_state: int | None = 0,
    device: str | torch.device = "auto",
    copy: bool = False,
) -> AnnData | None:
    """Fit a splicing-kinetics vector field with Flux Matching and write RNA velocities.

    For each gene the field maps the cell's smoothed ``(u, s)`` to ``(du/dt, ds/dt)`` under transcription
    (a positive drive that depends on ``u`` and ``s``), splicing ``beta`` and degradation ``gamma``. The
    Flux Matching loss fits it so that the data are its stationary law (see the method page).

    Dask-backed layers are read in blocks of genes over all cells (the field is gene-local), and the fit reads
    only the cells its minibatches draw (the default's fixed budget: at most ``n_steps * batch_size`` cells).
    The velocity layers are then written as Dask arrays, computed when read; the results equal the in-memory
    ones with ``state_rank=False`` to float32 rounding (the scale page of the docs).

    Parameters
    ----------
    adata
        Annotated data matrix with smoothed abundances in ``layers[layer_spliced]`` and
        ``layers[layer_unspliced]`` (run :func:`fluxvelo.pp.moments` first).
    preset
        ``'default'`` (per-gene scaling, settings chosen by the benchmark) or ``'paper'`` (the reference
        settings: sigma2 1e-3, 100 epochs, batch 256, lr 1e-3, unscaled inputs, and a velocity graph on
        square-rooted velocities, as in the paper's pipeline). Explicit options override it.
    field
        Field family: ``'kinetic'`` (the paper's) or ``'linear'`` (constant transcription per gene).
    turnover
        Population balance: where cells are born and where they leave. The fit then asks that the data be
        stationary under the field's dynamics *with* this turnover, so that the field carries a net flow from
        births to losses instead of none. ``'auto'`` (the default preset's) uses ``'cell_cycle'`` where at
        least 5 cell-cycle marker genes are in ``var_names`` and no turnover otherwise; ``'cell_cycle'`` is a
        proliferation score from those markers; the name of an ``obs`` column with a score per cell (higher =
        more births); an array with one value per cell; or None/False for the paper's strictly stationary
        model. The score is centred (births balance losses) and scaled to ``turnover_rate``. Never derive it
        from the cluster labels you evaluate on.
    turnover_rate
        Standard deviation of the turnover rates in the fit's time unit at ``gene_scale=10`` (default 0.01, the
        splicing rate at the balanced start; chosen on two simulators for a score from a few noisy marker
        genes, as ``'auto'`` reads it; with a noise-free turnover 0.005 did better there; see the diagnosis
        page). At another ``gene_scale`` it is scaled by ``(10 / gene_scale)^2``, which keeps its size against
        the splicing rate; with ``gene_scale=False`` it is used as given.
    balance
        Start the fit at the exact moment balance of the constant-drive kinetic field (with the turnover) and
        hold ``gamma`` to the balance of the spliced mean, ``gamma = (beta E[u] + E[g s]) / E[s]``; the fit then
        sets ``beta`` and the drive. ``'auto'`` (the default preset's) balances whenever a turnover is used.
    velocity_genes
        How ``var['velocity_genes']`` is chosen among the fitted genes: ``'steady_state'`` (scVelo's
        stochastic-model criterion, independent of the fit, as the paper's pipeline uses; it needs the
        ``'spliced'``/``'unspliced'`` layers and the neighbour graph), ``'fit'`` (the fitted steady-state
        line, see ``min_r2``) or ``'auto'`` (the default preset's: ``'steady_state'`` where its inputs are
        there, else ``'fit'``).
    state_rank
        Where the fitted field is read: at each cell's smoothed ``(u, s)`` projected onto this many leading
        principal axes of all fitted genes' standardised ``u`` and ``s`` (the lineage moves the genes together
        along a few shared axes; each gene's own noise is dropped), or, with False, at the smoothed states as
        given. ``'auto'`` (the default preset's) is 20, chosen on three simulators, for layers in memory; Dask-backed
        layers are read as given. The fit itself always sees the smoothed states as given.
    sigma2
        Kernel noise level ``sigma^2``, in the units of the (rescaled, see ``gene_scale``) inputs.
    epochs
        Passes over all cells. Overrides the preset's ``n_steps``.
    n_steps
        Length of the fit in optimiser steps, when ``epochs`` is not given (the default preset's budget:
        its cost does not grow with the number of cells).
    batch_size
        Cells per minibatch; the kernel score is that of the batch.
    lr
        Adam learning rate.
    horizon
        Rollout horizon ``H``.
    n_substeps
        Langevin sub-steps ``M`` of the rollout.
    gene_scale
        Rescale each gene's ``u`` and ``s`` to this standard deviation before the fit, so that ``sigma2`` and the
        unit diffusion of the stationary process mean the same for every gene; False fits the inputs as they are.
        Velocities are reported in the original units.
    min_r2
        Velocity genes explain the cells' unspliced abundance by a steady-state line ``u = gamma' s`` better
        than its mean by at least this coefficient of determination: scVelo's line or the fitted one, see
        ``velocity_genes``. All fitted genes keep their velocity; this only sets ``var['velocity_genes']``,
        which the velocity graph uses. False keeps every fitted gene.
    time_unit
        ``'splicing'`` reports each gene's velocity per unit of its own splicing time, so that in original
        units ``ds/dt = u - gamma' s`` (scVelo's convention, ``beta = 1``); ``'diffusion'`` keeps the fit's
        time, in which the stationary process has unit diffusion in the rescaled coordinates.
    shared_clock
        How far each gene's time unit (``time_unit``) is pulled toward a clock shared by all genes, from 0 (or
        False: the gene's own) to 1: the unit in which every gene's spliced velocity spreads over the cells as much
        as its spliced abundance, as if all genes followed one lineage time. Between the two it is their geometric
        interpolation. It rescales each gene's velocities by one positive factor, so no gene's direction changes,
        only how the genes weigh against each other in the velocity graph. The default preset's 0.25 was chosen
        on three simulators.
    steady_state_ratio
        How far each gene's ratio ``gamma / beta`` (the slope of its ``ds/dt = 0`` line) is pulled, in log, from
        the fitted one toward scVelo's extreme-quantile steady-state ratio, from 0 (or False: the fitted ratio) to
        1. The fit holds each gene to its data's balance, whose ratio errs where the cells are far from a steady
        state; the extreme-quantile line errs elsewhere, so a blend of the two scatters less. The velocities are
        read with the pooled ``gamma`` (``var['fit_gamma_read']``); ``var['fit_gamma']`` and the stationarity
        are the fit's. The default preset's 0.25 was chosen on three simulators.
    layer_spliced, layer_unspliced
        Layers with the smoothed spliced and unspliced abundances.
    key_added
        Prefix of the written keys.
    random_state
        Seed of every random draw of the fit. The same seed gives the same result on the same device.
    device
        ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'``, ``'cuda:<i>'`` or a :class:`torch.device`.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    Returns None, or a copy of ``adata`` when ``copy=True``, with:

    ``adata.layers['velocity']``
        Spliced velocity ``ds/dt`` per cell and gene (NaN for genes that were not fitted).
    ``adata.layers['velocity_u']``
        Unspliced velocity ``du/dt``, in the same time unit as ``layers['velocity']``. With
        ``time_unit='splicing'`` its decay term is ``-(std(u) / std(s)) u`` (the time unit makes the splicing
        term of ``ds/dt`` exactly ``u``, so the unspliced equation keeps the fit's ratio of scales).
    ``adata.layers['velocity_drive']``
        Transcription drive per cell and gene, in units of ``u`` per unit time.
    ``adata.var['velocity_genes']``
        Fitted genes that pass ``min_r2`` (see ``velocity_genes``); the velocity graph uses these.
    ``adata.var['fit_beta']``, ``['fit_gamma']``, ``['fit_drive_a']``, ``['fit_drive_b']``, ``['fit_drive_c']``
        Splicing and degradation rates and drive coefficients, in scaled units. For another ``key_added``
        the columns are prefixed with it (``'<key>_fit_beta'``), so that several fits can coexist.
    ``adata.var['fit_scaling_u']``, ``['fit_scaling_s']``, ``['fit_loss']``
        Per-gene input scales and the training loss averaged over the last epoch's worth of steps.
    ``adata.var['fit_time_scale']``
        Per gene, the factor from the fit's time to the time unit of the velocities (``time_unit``, pulled toward
        the shared clock by ``shared_clock``): in original units, ``ds/dt`` is the fitted field times
        ``fit_scaling_s * fit_time_scale``.
    ``adata.var['fit_gamma_read']``
        The degradation rate the velocities are read with: ``fit_gamma`` pulled toward the steady-state ratio
        by ``steady_state_ratio`` (equal to it without).
    ``adata.var['fit_stationarity']``
        ``|E[f] + Cov(x, g)| / E[|f|]`` per gene in the fit's coordinates: 0 when the fitted field balances the
        data's density (with turnover ``g``), near 1 when its mean over the cells is as large as the field. Taken
        over the cells the fit saw: every cell once the fit runs an epoch or more (pancreas's default does), else
        the at most ``n_steps * batch_size`` cells its minibatches drew.
    ``adata.uns['velocity_params']``
        Every setting that is set (unset ones are left out), the package version, the device, the loss
        history, the median stationarity over the fitted genes and the fit time.
    """
    opts = resolve_options(
        preset, sigma2=sigma2, epochs=epochs, n_steps=n_steps, batch_size=batch_size, lr=lr, gene_scale=gene_scale,
        min_r2=min_r2, time_unit=time_unit, turnover=turnover, turnover_rate=turnover_rate, balance=balance,
        velocity_genes=velocity_genes, state_rank=state_rank, shared_clock=shared_clock,
        steady_state_ratio=steady_state_ratio,
    )  # fmt: skip
    if field not in FIELDS:
        raise ValueError(f"Unknown field {field!r}; choose one of {sorted(FIELDS)}.")
    dev = resolve_device(device)
    compile_fit_kernels_ahead(dev.type)  # where not cached, they compile while the input is built
    opts["turnover"] = resolve_source(adata, opts["turnover"])
    rates_g = turnover_rates(adata, opts["turnover"], rate=turnover_std(opts["turnover_rate"], opts["gene_scale"]))
    if opts["balance"] == "auto":
        opts["balance"] = rates_g is not None
    opts["velocity_genes"] = velocity_gene_criterion(adata, opts)
    rng, generator = make_generators(random_state, dev)
    plan = BatchPlan.make(adata.n_obs, epochs=opts["epochs"], n_steps=opts["n_steps"], batch_size=opts["batch_size"],
                          remainder=opts["remainder"])  # fmt: skip
    # the cells the fit will see (every cell for a fit of one epoch or more); lazy layers: gathered in the pass
    # that checks them, with the balance moments and scVelo's quantile fit
    cells = plan.cells(rng)
    inp = build_input(adata, layer_spliced, layer_unspliced, opts["gene_scale"], cells=cells,
                      turnover=rates_g if opts["balance"] else None,
                      quantiles=opts["velocity_genes"] == "steady_state" or bool(opts["steady_state_ratio"]))  # fmt: skip
    opts["state_rank"] = resolve_state_rank(opts["state_rank"], inp)
    if inp.lazy:
        release_memory()  # the pass over blocks of genes leaves freed heap behind
    data = torch.from_numpy(inp.fit_data).to(dev)
    rates_t = None if rates_g is None else torch.from_numpy(rates_g).to(dev)
    moments = data_moments(inp, data, rates_t) if opts["balance"] else None
    model = build_field(field, data.shape[0], dev, moments, unit=opts["gene_scale"] or 1.0)
    loss_scale = opts["sigma2"] ** 2 if opts["loss_scale"] == "sigma4" else 1.0
    logger.info(
        "fitting %s field to %d genes x %d cells on %s%s", field, data.shape[0], adata.n_obs, dev,
        "" if rates_g is None else f" with turnover {opts['turnover'] if isinstance(opts['turnover'], str) else '(array)'}",
    )  # fmt: skip
    start = time.perf_counter()
    fit = fit_field(
        model,
        data,
        plan,
        sigma2=opts["sigma2"],
        lr=opts["lr"],
        horizon=horizon,
        n_substeps=n_substeps,
        loss_scale=loss_scale,
        rng=rng,
        generator=generator,
        turnover=rates_t,
        cells=cells if inp.lazy else None,  # lazy: data holds only these rows
        desc="velocity",
    )
    fit_time = time.perf_counter() - start

    rates = {k: v.cpu().numpy() for k, v in model.rates().items()}
    table = steady_state_table(adata, inp, opts, (layer_spliced, layer_unspliced))
    genes = select_velocity_genes(inp, rates, opts, table)
    ratio = steady_state_ratios(adata, inp, table, (layer_spliced, layer_unspliced)) if opts["steady_state_ratio"] else None
    with cpu_threads(0, n_jobs=fit.threads, device_type=dev.type):  # the fit's last thread count, not all cores
        values = read_field(model, data, inp, cells, rates, rates_g, opts, rng, ratio, n_vars=adata.n_vars)
    del data

    params = _params(opts, preset=preset, field=field, loss_scale=loss_scale, horizon=horizon, n_substeps=n_substeps,
                     layers=(layer_spliced, layer_unspliced), random_state=random_state, device=dev, fit=fit,
                     fit_time=fit_time, stationarity=values.stationarity)  # fmt: skip
    adata = adata.copy() if copy else adata
    _write(adata, key_added, inp, rates, values, genes, fit, params)
    logger.info("finished velocity in %.1f s (%d steps)", fit_time, fit.n_steps)
    return adata if copy else None


def read_field(model: torch.nn.Module, data: torch.Tensor, inp: FitInput, cells: np.ndarray,
               rates: dict[str, np.ndarray], rates_g: np.ndarray | None, opts: dict[str, Any], rng: np.random.Generator,
               ratio: np.ndarray | None, *, n_vars: int) -> FieldValues:  # fmt: skip
    """The fitted field read at every cell (at the shared states where ``state_rank`` asks), in each gene's clock,
    with its ``gamma`` pulled toward the steady-state ``ratio`` where ``steady_state_ratio`` asks, and its
    stationarity over the cells the fit saw (before that pull)."""
    # In original units ds/dt = beta * (scale_s / scale_u) * u - gamma * s; 'splicing' divides by that u coefficient.
    if opts["time_unit"] == "splicing":
        time_scale = inp.scale_u / (rates["beta"] * inp.scale_s)
    else:
        time_scale = np.ones_like(rates["beta"])
    seen = data if inp.lazy or cells.size == data.shape[1] else data[:, torch.from_numpy(cells).to(data.device)]
    balance = stationarity(model, seen, None if rates_g is None else rates_g[cells])
    del seen
    gamma = rates["gamma"]
    if opts["steady_state_ratio"]:
        gamma = steady_state_gamma(rates, inp, ratio, opts["steady_state_ratio"])
        model.fix_gamma(torch.from_numpy(gamma).to(data.device))
    if not inp.lazy and opts["state_rank"]:
        data = torch.from_numpy(low_rank_states(inp.blocks, opts["state_rank"], rng)).to(data.device)
    if opts["shared_clock"]:  # read over the states where the field is read (lazy: the cells the fit saw)
        time_scale = pooled_time_scale(model, data, inp, time_scale, opts["shared_clock"])
    if inp.lazy:
        return FieldValues(*evaluate_lazy(model, inp, time_scale, n_vars), balance, time_scale, gamma)
    return FieldValues(*evaluate_field(model, data, inp, time_scale, n_vars), balance, time_scale, gamma)


def _params(opts: dict[str, Any], *, preset, field, loss_scale, horizon, n_substeps, layers, random_state, device,
            fit: FitResult, fit_time: float, stationarity: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """``uns['<key>_params']``: every setting that is set (h5ad stores no None), the version and the fit's record."""
    settings = {k: v for k, v in opts.items() if v is not None and k != "loss_scale"}
    if not isinstance(settings.get("turnover", ""), str):
        settings["turnover"] = "array"
    return {
        "mode": "flux_matching",
        "preset": preset,
        "field": field,
        **settings,
        "loss_scale": loss_scale,
        "horizon": horizon,
        "n_substeps": n_substeps,
        "layer_spliced": layers[0],
        "layer_unspliced": layers[1],
        "random_state": -1 if random_state is None else random_state,
        "device": str(device),
        "version": __version__,
        "steps_taken": fit.n_steps,
        "fit_time_s": fit_time,
        "stationarity_median": float(np.median(stationarity)),
        "loss_history": np.asarray(fit.loss_history, np.float64),
    }


def _write(adata: AnnData, key: str, inp: FitInput, rates: dict[str, np.ndarray], values: FieldValues,
           velocity_genes: np.ndarray, fit: FitResult, params: dict[str, Any]) -> None:  # fmt: skip
    """Write every result into ``adata`` in one go (everything was computed before)."""

    def per_gene(per_fitted: np.ndarray) -> np.ndarray:
        out = np.full(adata.n_vars, np.nan, np.float32)
        out[inp.genes] = per_fitted
        return out

    columns = {
        keys.FIT_ALPHA_U: rates["a"], keys.FIT_ALPHA_S: rates["b"], keys.FIT_ALPHA_0: rates["c"],
        keys.FIT_BETA: rates["beta"], keys.FIT_GAMMA: rates["gamma"], keys.FIT_SCALE_U: inp.scale_u,
        keys.FIT_SCALE_S: inp.scale_s, keys.FIT_LOSS: fit.gene_loss, keys.FIT_STATIONARITY: values.stationarity,
        keys.FIT_TIME_SCALE: values.time_scale, keys.FIT_GAMMA_READ: values.gamma,
    }  # fmt: skip
    save_many(
        adata,
        [
            ("layers", key, values.velocity),
            ("layers", keys.VELOCITY_U.format(key=key), values.velocity_u),
            ("layers", keys.DRIVE.format(key=key), values.drive),
            ("var", keys.VELOCITY_GENES.format(key=key), velocity_genes),
            *(("var", keys.fit_column(name, key), per_gene(v)) for name, v in columns.items()),
            ("uns", keys.PARAMS.format(key=key), params),
        ],
    )
