"""The methods the benchmark compares. Each fits velocities into ``layers['velocity']`` of the AnnData it gets."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from anndata import AnnData

from .. import _keys as keys


@dataclass(frozen=True)
class Method:
    """A velocity method of the benchmark.

    Attributes
    ----------
    name
        Name used on the command line and in the tables.
    description
        One line for the report.
    fit
        ``fit(adata, seed, options) -> settings``: writes ``layers['velocity']`` (and ``var['velocity_genes']``)
        in place and returns the settings that were actually used.
    deterministic
        The result does not depend on the seed, so one run stands for all seeds.
    needs
        Optional package the method imports, or None.
    """

    name: str
    description: str
    fit: Callable[[AnnData, int, dict[str, Any]], dict[str, Any]]
    deterministic: bool = False
    needs: str | None = None


def _fluxvelo(preset: str) -> Callable[[AnnData, int, dict[str, Any]], dict[str, Any]]:
    def fit(adata: AnnData, seed: int, options: dict[str, Any]) -> dict[str, Any]:
        from ..tl import velocity

        velocity(adata, preset=preset, random_state=seed, **options)
        params = adata.uns[keys.PARAMS.format(key=keys.VELOCITY)]
        out = {}  # every scalar setting the fit recorded (not the loss history or the timing)
        for k, v in params.items():
            v = v.item() if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0) else v
            if (v is None or isinstance(v, (str, int, float, bool))) and k != "fit_time_s":
                out[k] = v
        return out

    return fit


@contextlib.contextmanager
def _quiet_scvelo():
    import scvelo as scv

    old = scv.settings.verbosity
    scv.settings.verbosity = 0
    try:
        yield scv
    finally:
        scv.settings.verbosity = old


def _scvelo_stochastic(adata: AnnData, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    with _quiet_scvelo() as scv:
        scv.tl.velocity(adata, mode="stochastic", **options)
        return {"mode": "stochastic", **options, "version": scv.__version__}


def _scvelo_dynamical(adata: AnnData, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    opts = {"n_jobs": 2, **options}
    with _quiet_scvelo() as scv:
        scv.tl.recover_dynamics(adata, **opts)
        scv.tl.velocity(adata, mode="dynamical")
        return {"mode": "dynamical", **opts, "version": scv.__version__}


#: The methods, by name.
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fluxvelo", "fv.tl.velocity, preset 'default'", _fluxvelo("default")),
        Method("fluxvelo_paper", "fv.tl.velocity, preset 'paper' (the reference settings)", _fluxvelo("paper")),
        Method(
            "scvelo_stochastic", "scvelo.tl.velocity(mode='stochastic')", _scvelo_stochastic, True, "scvelo"
        ),
        Method(
            "scvelo_dynamical",
            "scvelo.tl.recover_dynamics + scvelo.tl.velocity(mode='dynamical')",
            _scvelo_dynamical,
            True,
            "scvelo",
        ),
    ]
}
