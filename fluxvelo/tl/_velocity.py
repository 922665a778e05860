"""``fv.tl.velocity``: fit the gene-local kinetic field with Flux Matching and write velocities."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from .. import __version__
from .. import _keys as keys
from .._jit import compile_fit_kernels_ahead
from .._lazy import release_memory
from .._threads import cpu_threads
from .._utils import make_generators, resolve_device, save_many
from ..fields import FIELDS, moment_rates
from ._fit import BatchPlan, FitResult, fit_field
from ._input import FitInput, build_input, data_moments
from ._options import resolve_options, resolve_state_rank, turnover_std
from ._reading import FieldValues, fit_stationarity, read_field, steady_state_ratios
from ._turnover import resolve_source, turnover_rates
from ._velocity_genes import select_velocity_genes, steady_state_table, velocity_gene_criterion

logger = logging.getLogger("fluxvelo")


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
        given. ``'auto'`` (the default preset's) is 20 for layers in memory, or half the number of fitted genes
        where that is fewer, both chosen on three simulators; Dask-backed layers are read as given. The fit
        itself always sees the smoothed states as given.
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
    opts["state_rank"] = resolve_state_rank(opts["state_rank"], lazy=inp.lazy, n_genes=inp.idx.size)
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
        balance = fit_stationarity(model, data, inp, cells, rates_g)
        values = read_field(model, data, inp, rates, opts, rng, ratio, n_vars=adata.n_vars)
    del data

    params = _params(opts, preset=preset, field=field, loss_scale=loss_scale, horizon=horizon, n_substeps=n_substeps,
                     layers=(layer_spliced, layer_unspliced), random_state=random_state, device=dev, fit=fit,
                     fit_time=fit_time, stationarity=balance)  # fmt: skip
    adata = adata.copy() if copy else adata
    _write(adata, key_added, inp, rates, values, genes, fit, params, stationarity=balance)
    logger.info("finished velocity in %.1f s (%d steps)", fit_time, fit.n_steps)
    return adata if copy else None


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
           velocity_genes: np.ndarray, fit: FitResult, params: dict[str, Any], *, stationarity: np.ndarray) -> None:  # fmt: skip
    """Write every result into ``adata`` in one go (everything was computed before)."""

    def per_gene(per_fitted: np.ndarray) -> np.ndarray:
        out = np.full(adata.n_vars, np.nan, np.float32)
        out[inp.genes] = per_fitted
        return out

    columns = {
        keys.FIT_ALPHA_U: rates["a"], keys.FIT_ALPHA_S: rates["b"], keys.FIT_ALPHA_0: rates["c"],
        keys.FIT_BETA: rates["beta"], keys.FIT_GAMMA: rates["gamma"], keys.FIT_SCALE_U: inp.scale_u,
        keys.FIT_SCALE_S: inp.scale_s, keys.FIT_LOSS: fit.gene_loss, keys.FIT_STATIONARITY: stationarity,
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
