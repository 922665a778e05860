"""The settings of ``fv.tl.velocity``: its presets, the constants chosen for them, and how explicit options
resolve against a preset."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._states import default_rank

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


def resolve_state_rank(rank: int | str | None, *, lazy: bool, n_genes: int) -> int | None:
    """The principal axes of the states where the field is read: ``'auto'`` is :func:`~._states.default_rank` of
    the ``n_genes`` fitted genes for layers in memory and None (the smoothed states as given) for lazy ones, where
    an explicit rank is an error."""
    if rank == "auto":
        return None if lazy else default_rank(n_genes)
    if rank is not None and lazy:
        raise ValueError(
            f"state_rank={rank} needs the smoothed layers in memory; load them (adata.layers[...] = "
            "adata.layers[...].compute()) or pass state_rank=False."
        )
    return None if rank is None else int(rank)
