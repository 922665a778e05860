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
from .._utils import make_generators, resolve_device, save_many, to_dense
from ..fields import FIELDS
from ..pp._checks import check_finite, check_layers, check_nonempty
from ._fit import fit_field

logger = logging.getLogger("fluxvelo")

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
        time_unit="splicing",
        loss_scale=None,
    ),
    "paper": dict(
        sigma2=1e-3,
        epochs=100,
        n_steps=None,
        batch_size=256,
        lr=1e-3,
        gene_scale=None,
        min_r2=None,
        time_unit="diffusion",
        loss_scale="sigma4",
    ),
}


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


def velocity(
    adata: AnnData,
    *,
    preset: str = "default",
    field: str = "kinetic",
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

    Parameters
    ----------
    adata
        Annotated data matrix with smoothed abundances in ``layers[layer_spliced]`` and
        ``layers[layer_unspliced]`` (run :func:`fluxvelo.pp.moments` first).
    preset
        ``'default'`` (per-gene scaling, settings chosen by the benchmark) or ``'paper'`` (the reference
        settings: sigma2 1e-3, 100 epochs, batch 256, lr 1e-3, unscaled inputs). Explicit options override it.
    field
        Field family: ``'kinetic'`` (the paper's) or ``'linear'`` (constant transcription per gene).
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
        Velocity genes are those whose fitted ``ds/dt = 0`` line, ``u = (gamma / beta) s``, explains the cells'
        unspliced abundance better than its mean by at least this coefficient of determination (scVelo applies
        the same threshold to its steady-state fit). All fitted genes keep their velocity; this only sets
        ``var['velocity_genes']``, which the velocity graph uses. False keeps every fitted gene.
    time_unit
        ``'splicing'`` reports each gene's velocity per unit of its own splicing time, so that in original
        units ``ds/dt = u - gamma' s`` (scVelo's convention, ``beta = 1``); ``'diffusion'`` keeps the fit's
        time, in which the stationary process has unit diffusion in the rescaled coordinates.
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
        Unspliced velocity ``du/dt``.
    ``adata.layers['velocity_drive']``
        Transcription drive per cell and gene, in units of ``u`` per unit time.
    ``adata.var['velocity_genes']``
        Fitted genes that pass ``min_r2``; the velocity graph uses these.
    ``adata.var['fit_beta']``, ``['fit_gamma']``, ``['fit_drive_a']``, ``['fit_drive_b']``, ``['fit_drive_c']``
        Splicing and degradation rates and drive coefficients, in scaled units. For another ``key_added``
        the columns are prefixed with it (``'<key>_fit_beta'``), so that several fits can coexist.
    ``adata.var['fit_scaling_u']``, ``['fit_scaling_s']``, ``['fit_loss']``
        Per-gene input scales and final training loss.
    ``adata.uns['velocity_params']``
        Every setting, the package version, the device, the loss history and the fit time.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    if field not in FIELDS:
        raise ValueError(f"Unknown field {field!r}; choose one of {sorted(FIELDS)}.")
    opts = {**PRESETS[preset]}
    if epochs is not None or n_steps is not None:
        opts["epochs"], opts["n_steps"] = epochs, n_steps
    if min_r2 is not None:
        opts["min_r2"] = None if min_r2 is False else float(min_r2)
    overrides = dict(sigma2=sigma2, batch_size=batch_size, lr=lr, time_unit=time_unit)
    for name, value in overrides.items():
        if value is not None:
            opts[name] = value
    if gene_scale is not None:
        opts["gene_scale"] = float(gene_scale) if gene_scale is not False else None
    if opts["time_unit"] not in ("splicing", "diffusion"):
        raise ValueError(f"Unknown time_unit {opts['time_unit']!r}; use 'splicing' or 'diffusion'.")
    if opts["epochs"] is None and opts["n_steps"] is None:
        raise ValueError("Give epochs or n_steps.")
    if (opts["epochs"] or 1) < 1 or (opts["n_steps"] or 1) < 1:
        raise ValueError("epochs and n_steps must be at least 1.")
    if opts["sigma2"] <= 0 or opts["batch_size"] < 2 or opts["lr"] <= 0:
        raise ValueError("sigma2 and lr must be positive and batch_size at least 2.")

    check_nonempty(adata)
    check_layers(
        adata, [layer_spliced, layer_unspliced], hint="run fluxvelo.pp.moments(adata) (or the preprocessing recipe) first."
    )
    check_finite(adata, [layer_spliced, layer_unspliced])
    # no copy when the layers are dense float32 already
    s_all = np.asarray(to_dense(adata.layers[layer_spliced]), dtype=np.float32)
    u_all = np.asarray(to_dense(adata.layers[layer_unspliced]), dtype=np.float32)
    if (s_all < 0).any() or (u_all < 0).any():
        raise ValueError("Smoothed abundances must be non-negative; recompute them with fluxvelo.pp.moments.")
    if adata.n_obs < 3:
        raise ValueError(f"Too few cells ({adata.n_obs}) to fit a velocity field; at least 3 are needed.")
    std_u, std_s = _column_std(u_all), _column_std(s_all)
    genes = (std_u > 0) & (std_s > 0)  # genes with signal in both layers; others are not fitted
    if not genes.any():
        raise ValueError("No gene varies in both spliced and unspliced abundance; nothing to fit.")

    dev = resolve_device(device)
    rng, generator = make_generators(random_state, dev)
    idx = np.flatnonzero(genes)
    target = opts["gene_scale"]
    scale_u = std_u[idx] / target if target else np.ones(idx.size, np.float32)
    scale_s = std_s[idx] / target if target else np.ones(idx.size, np.float32)
    blocks = _blocks(u_all, s_all, idx, scale_u, scale_s)
    data = torch.from_numpy(blocks).to(dev)

    model = FIELDS[field](int(genes.sum())).to(dev)
    loss_scale = opts["sigma2"] ** 2 if opts["loss_scale"] == "sigma4" else 1.0
    logger.info("fitting %s field to %d genes x %d cells on %s", field, data.shape[0], data.shape[1], dev)
    start = time.perf_counter()
    fit = fit_field(
        model,
        data,
        sigma2=opts["sigma2"],
        epochs=opts["epochs"],
        n_steps=opts["n_steps"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        horizon=horizon,
        n_substeps=n_substeps,
        loss_scale=loss_scale,
        rng=rng,
        generator=generator,
        desc="velocity",
    )
    fit_time = time.perf_counter() - start

    rates = {k: v.cpu().numpy() for k, v in model.rates().items()}
    velocity_genes = genes.copy()
    if opts["min_r2"] is not None:
        velocity_genes[genes] = _steady_state_r2(blocks, rates["gamma"] / rates["beta"]) > opts["min_r2"]
    # In original units ds/dt = beta * (scale_s / scale_u) * u - gamma * s; 'splicing' divides by that u coefficient.
    if opts["time_unit"] == "splicing":
        time_scale = scale_u / (rates["beta"] * scale_s)
    else:
        time_scale = np.ones_like(rates["beta"])
    n_obs, n_vars = adata.shape
    velocity_s = np.full((n_obs, n_vars), np.nan, np.float32)
    velocity_u = np.full((n_obs, n_vars), np.nan, np.float32)
    drive_full = np.full((n_obs, n_vars), np.nan, np.float32)
    with torch.no_grad():
        for start in range(0, n_obs, CELL_CHUNK):
            cells = slice(start, start + CELL_CHUNK)
            flow = model(data[:, cells]).cpu().numpy()  # [genes, chunk, 2] in scaled units
            velocity_s[cells, idx] = flow[..., 1].T * (scale_s * time_scale)
            velocity_u[cells, idx] = flow[..., 0].T * (scale_u * time_scale)
            drive_full[cells, idx] = model.drive(data[:, cells]).cpu().numpy().T * (scale_u * time_scale)
    del blocks, data

    def per_gene(values: np.ndarray) -> np.ndarray:
        out = np.full(n_vars, np.nan, np.float32)
        out[genes] = values
        return out

    params = {
        "mode": "flux_matching",
        "preset": preset,
        "field": field,
        # h5ad cannot store None: unset options are written as 'none'
        **{k: "none" if v is None else v for k, v in opts.items() if k != "loss_scale"},
        "loss_scale": loss_scale,
        "horizon": horizon,
        "n_substeps": n_substeps,
        "layer_spliced": layer_spliced,
        "layer_unspliced": layer_unspliced,
        "random_state": -1 if random_state is None else random_state,
        "device": str(dev),
        "version": __version__,
        "steps_taken": fit.n_steps,
        "fit_time_s": fit_time,
        "loss_history": np.asarray(fit.loss_history, np.float64),
    }
    adata = adata.copy() if copy else adata
    save_many(
        adata,
        [
            ("layers", key_added, velocity_s),
            ("layers", keys.VELOCITY_U.format(key=key_added), velocity_u),
            ("layers", keys.DRIVE.format(key=key_added), drive_full),
            ("var", keys.VELOCITY_GENES.format(key=key_added), velocity_genes),
            ("var", keys.fit_column(keys.FIT_ALPHA_U, key_added), per_gene(rates["a"])),
            ("var", keys.fit_column(keys.FIT_ALPHA_S, key_added), per_gene(rates["b"])),
            ("var", keys.fit_column(keys.FIT_ALPHA_0, key_added), per_gene(rates["c"])),
            ("var", keys.fit_column(keys.FIT_BETA, key_added), per_gene(rates["beta"])),
            ("var", keys.fit_column(keys.FIT_GAMMA, key_added), per_gene(rates["gamma"])),
            ("var", keys.fit_column(keys.FIT_SCALE_U, key_added), per_gene(scale_u)),
            ("var", keys.fit_column(keys.FIT_SCALE_S, key_added), per_gene(scale_s)),
            ("var", keys.fit_column(keys.FIT_LOSS, key_added), per_gene(fit.gene_loss)),
            ("uns", keys.PARAMS.format(key=key_added), params),
        ],
    )
    logger.info("finished velocity in %.1f s (%d steps)", fit_time, fit.n_steps)
    return adata if copy else None
