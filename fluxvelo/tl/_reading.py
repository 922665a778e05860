"""The fitted field read at every cell: in each gene's clock, at the shared states, with the steady-state ratio;
in memory or as Dask arrays computed when read."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from ._input import FitInput, cell_chunks, column_std, scaled_blocks
from ._states import low_rank_states
from ._steady_state import QuantileFit


@dataclass
class FieldValues:
    """The fitted field over all cells, in original units; per gene the factor to the velocities' time unit and the
    ``gamma`` they are read with."""

    velocity: np.ndarray
    velocity_u: np.ndarray
    drive: np.ndarray
    time_scale: np.ndarray
    gamma: np.ndarray


def read_field(model: torch.nn.Module, data: torch.Tensor, inp: FitInput, rates: dict[str, np.ndarray],
               opts: dict[str, Any], rng: np.random.Generator, ratio: np.ndarray | None, *,
               n_vars: int) -> FieldValues:  # fmt: skip
    """The fitted field read at every cell (at the shared states where ``state_rank`` asks), in each gene's clock,
    with its ``gamma`` pulled toward the steady-state ``ratio`` where ``steady_state_ratio`` asks."""
    # In original units ds/dt = beta * (scale_s / scale_u) * u - gamma * s; 'splicing' divides by that u coefficient.
    if opts["time_unit"] == "splicing":
        time_scale = inp.scale_u / (rates["beta"] * inp.scale_s)
    else:
        time_scale = np.ones_like(rates["beta"])
    gamma = rates["gamma"]
    if opts["steady_state_ratio"]:
        gamma = steady_state_gamma(rates, inp, ratio, opts["steady_state_ratio"])
        model = copy.deepcopy(model)  # read with the pulled gamma; the fitted field stays as fitted
        model.fix_gamma(torch.from_numpy(gamma).to(data.device))
    if not inp.lazy and opts["state_rank"]:
        data = low_rank_states(data, opts["state_rank"], rng)
    if opts["shared_clock"]:  # read over the states where the field is read (lazy: the cells the fit saw)
        time_scale = pooled_time_scale(model, data, inp, time_scale, opts["shared_clock"])
    if inp.lazy:
        return FieldValues(*evaluate_lazy(model, inp, time_scale, n_vars), time_scale, gamma)
    return FieldValues(*evaluate_field(model, data, inp, time_scale, n_vars), time_scale, gamma)


def fit_stationarity(model: torch.nn.Module, data: torch.Tensor, inp: FitInput, cells: np.ndarray,
                     turnover: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """:func:`stationarity` over the cells the fit saw (``cells``, of which lazy layers' ``data`` holds only these)
    with their turnover rates."""
    seen = data if inp.lazy or cells.size == data.shape[1] else data[:, torch.from_numpy(cells).to(data.device)]
    return stationarity(model, seen, None if turnover is None else turnover[cells])


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
        for cells in cell_chunks(n):
            x = seen[:, cells]
            flow = model(x)
            sum_f += flow.sum(1, dtype=torch.float64).cpu()
            sum_norm += torch.linalg.vector_norm(flow, dim=-1).sum(1, dtype=torch.float64).cpu()
            if turnover is not None:
                g = torch.as_tensor(turnover[cells], dtype=x.dtype, device=x.device)
                sum_xg += torch.einsum("gcd,c->gd", x, g).double().cpu()
    balance = torch.linalg.vector_norm(sum_f + sum_xg, dim=-1) / torch.clamp(sum_norm, min=1e-30)
    return balance.numpy().astype(np.float32)


def steady_state_ratios(adata: AnnData, inp: FitInput, table, layers: tuple[str, str]) -> np.ndarray:
    """scVelo's extreme-quantile ratio ``Mu / Ms`` of each fitted gene: from ``table`` or the lazy input's pass where
    they hold it, else fitted here from the smoothed layers alone."""
    if table is not None:
        return table["qreg_ratio"].to_numpy()[inp.genes]
    if inp.quantiles is not None:
        return inp.quantiles.ratio[inp.genes]
    fit, _ = QuantileFit.over(*(adata.layers[name] for name in layers))  # as the table's fit reads them
    return fit.ratio[inp.genes]


def steady_state_gamma(rates: dict[str, np.ndarray], inp: FitInput, ratio: np.ndarray, weight: float) -> np.ndarray:
    """``gamma`` whose ratio to ``beta`` is the fitted one pulled, in log, toward the steady-state ``ratio`` (per
    fitted gene, in original units: ``Mu = ratio Ms`` on the steady-state line) by ``weight`` in [0, 1]. Genes where
    either ratio is not positive keep their fitted ``gamma``."""
    fitted = rates["gamma"].astype(np.float64) / rates["beta"]
    steady = np.asarray(ratio, np.float64) * inp.scale_s / inp.scale_u  # the same line in the fit's coordinates
    usable = np.isfinite(steady) & (steady > 0) & (fitted > 0)
    pooled = fitted ** (1 - weight) * np.where(usable, steady, fitted) ** weight
    return (rates["beta"] * np.where(usable, pooled, fitted)).astype(np.float32)


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
        for cells in cell_chunks(n):
            flow_s = model(states[:, cells])[..., 1].double().cpu().numpy()
            total += flow_s.sum(1)
            squares += (flow_s**2).sum(1)
    flow_std = np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0))
    spliced_std = column_std(inp.fit_data[..., 1].T).astype(np.float64)
    # a gene whose velocity does not vary has no shared pace: it keeps its own clock
    shared = np.divide(spliced_std, flow_std, out=time_scale.astype(np.float64), where=flow_std > 0)
    return (time_scale ** (1 - pooling) * shared**pooling).astype(np.float32)


def evaluate_field(model: torch.nn.Module, data: torch.Tensor, inp: FitInput, time_scale: np.ndarray,
                   n_vars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Spliced and unspliced velocity and drive at every cell, in cell chunks (lazy inputs: :func:`evaluate_lazy`)."""
    n_obs = data.shape[1]
    idx = inp.idx
    velocity_s = np.full((n_obs, n_vars), np.nan, np.float32)
    velocity_u = np.full((n_obs, n_vars), np.nan, np.float32)
    drive = np.full((n_obs, n_vars), np.nan, np.float32)
    with torch.no_grad():
        for cells in cell_chunks(n_obs):
            x = data[:, cells]
            flow = model(x).cpu().numpy()  # [genes, chunk, 2] in scaled units
            velocity_s[cells, idx] = flow[..., 1].T * (inp.scale_s * time_scale)
            velocity_u[cells, idx] = flow[..., 0].T * (inp.scale_u * time_scale)
            drive[cells, idx] = model.drive(x).cpu().numpy().T * (inp.scale_u * time_scale)
    return velocity_s, velocity_u, drive


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
            x = torch.from_numpy(scaled_blocks(np.asarray(u, np.float32), np.asarray(s, np.float32), local,
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
