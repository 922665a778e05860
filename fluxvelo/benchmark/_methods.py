"""The methods the benchmark compares, in one table (:data:`METHODS`), and :func:`register_method` to add one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
from anndata import AnnData

from .. import _keys as keys
from ._interface import Method
from ._peers import PEERS


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


#: The methods, by name. Add to it with :func:`register_method`.
METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the benchmark's table, so that :func:`fluxvelo.benchmark.run` and the CLI accept its name.

    Parameters
    ----------
    method
        The method (a :class:`Method` with a unique ``name``).
    replace
        Replace a method of the same name; otherwise that is an error.

    Returns
    -------
    The method, as registered.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a fluxvelo.benchmark.Method, got {type(method).__name__}.")
    if not method.name or "," in method.name or method.name != method.name.strip():
        raise ValueError(f"A method name must be non-empty, without commas or outer spaces; got {method.name!r}.")
    if method.name in METHODS and not replace:
        raise ValueError(f"A method named {method.name!r} is registered already; pass replace=True to replace it.")
    METHODS[method.name] = method
    return method


def _register_builtins() -> None:
    for m in [
        Method("fluxvelo", "fv.tl.velocity, preset 'default'", _fluxvelo("default")),
        Method("fluxvelo_paper", "fv.tl.velocity, preset 'paper' (the reference settings)", _fluxvelo("paper")),
        Method("scvelo_stochastic", "scvelo.tl.velocity(mode='stochastic')", _scvelo_stochastic, True, "scvelo",
               "scvelo"),  # fmt: skip
        Method("scvelo_dynamical", "scvelo.tl.recover_dynamics + scvelo.tl.velocity(mode='dynamical')",
               _scvelo_dynamical, True, "scvelo", "scvelo"),  # fmt: skip
        *PEERS,
    ]:
        register_method(m)


_register_builtins()
