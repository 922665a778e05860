"""Peer methods as benchmark adapters: veloVI, scvelo-rs, UniTVelo, cellDancer.

A peer runs in this process when its package is installed beside fluxvelo (the extras ``fluxvelo[velovi]``,
``fluxvelo[scvelo_rs]``), or in a separate Python environment when its options carry ``python`` (the
``peer_python`` of :func:`fluxvelo.benchmark.run`, ``--peer-python NAME=PATH`` on the command line); the
calls themselves are in :mod:`fluxvelo.benchmark._peer_fits`. A peer that is not installed, or that fails,
raises :class:`MethodNotAvailable` with the reason: the benchmark writes a row, never a number from elsewhere.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

from anndata import AnnData

from . import _peer_fits
from ._external import run_external
from ._interface import DATASET_KEY, Method, MethodNotAvailable

#: How to install each peer, for the 'method not available' reason.
_INSTALL = {
    "velovi": 'pip install "fluxvelo[velovi]", or run it in its own environment with --peer-python velovi=PATH',
    "scvelo_rs": 'pip install "fluxvelo[scvelo_rs]", or run it in its own environment with --peer-python '
    "scvelo_rs=PATH",
    "unitvelo": "UniTVelo needs TensorFlow, which conflicts with fluxvelo's dependencies: install it into its own "
    "virtualenv (benchmarks/peer_envs/unitvelo.sh in the repository) and pass "
    "--peer-python unitvelo=/path/to/venv/bin/python",
    "celldancer": "cellDancer pins old versions of its dependencies: install it into its own virtualenv "
    "(benchmarks/peer_envs/celldancer.sh in the repository) and pass "
    "--peer-python celldancer=/path/to/venv/bin/python",
}


def _dataset(adata: AnnData) -> tuple[str, str]:
    info = adata.uns.get(DATASET_KEY, {})
    return str(info.get("cluster_key", "clusters")), str(info.get("basis", "umap"))


def _peer(name: str):
    def fit(adata: AnnData, seed: int, options: dict[str, Any]) -> dict[str, Any]:
        fit_here, package = _peer_fits.FITS[name], _peer_fits.PACKAGES[name]
        opts = dict(options)
        python = opts.pop("python", None)
        timeout = opts.pop("timeout_s", None)
        cluster_key, basis = _dataset(adata)
        if python is not None:
            return run_external(python, name, adata, seed, opts, cluster_key=cluster_key, basis=basis,
                                timeout=timeout)  # fmt: skip
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise MethodNotAvailable(f"{package} is not installed here ({err}); {_INSTALL[name]}") from err
        try:
            with tempfile.TemporaryDirectory(prefix=f"fluxvelo-{name}-") as tmp:
                return fit_here(adata, seed, opts, cluster_key=cluster_key, basis=basis, workdir=Path(tmp))
        except Exception as err:  # noqa: BLE001 - a peer's failure is a row, not a crash
            raise MethodNotAvailable(f"{name} failed: {type(err).__name__}: {err}") from err

    fit.__name__ = f"fit_{name}"
    return fit


def external_method(
    name: str,
    description: str,
    *,
    script: str | os.PathLike,
    python: str | os.PathLike,
    package: str | None = None,
    deterministic: bool = False,
    timeout: float | None = None,
) -> Method:
    """A method whose fit runs in another Python environment, over the benchmark's ``.h5ad`` exchange.

    Register it with :func:`fluxvelo.benchmark.register_method`.

    Parameters
    ----------
    name
        The method's name; ``script`` defines ``fit_<name>(adata, seed, options, *, cluster_key, basis,
        workdir)``, which writes ``layers['velocity']`` and ``var['velocity_genes']`` and returns its settings.
        The script may import anything that environment has, but nothing from fluxvelo.
    description
        One line for the report.
    script
        The Python file with the fit function.
    python
        That environment's Python executable.
    package
        A package that environment must have (else ``'method not available'``), or None.
    deterministic
        The result does not depend on the seed.
    timeout
        Seconds before the other process is stopped (then ``'method not available'``).

    Returns
    -------
    The :class:`Method`.
    """
    script, python = Path(script), Path(python)

    def fit(adata: AnnData, seed: int, options: dict[str, Any]) -> dict[str, Any]:
        cluster_key, basis = _dataset(adata)
        return run_external(python, name, adata, seed, dict(options), cluster_key=cluster_key, basis=basis,
                            package=package, script=script, timeout=timeout)  # fmt: skip

    return Method(name, description, fit, deterministic=deterministic, external=True)


#: The peers, as registered in :data:`fluxvelo.benchmark.METHODS`.
PEERS = [
    Method("velovi", "veloVI: preprocess_data, VELOVI on Ms/Mu, train, get_velocity (its tutorial)", _peer("velovi"),
           extra="velovi", external=True),  # fmt: skip
    Method("unitvelo", "UniTVelo: run_model(adata, label, Configuration(), normalize=False)", _peer("unitvelo"),
           external=True),  # fmt: skip
    Method("scvelo_rs", "scvelo-rs: recover_dynamics + velocity(mode='dynamical') (its README)", _peer("scvelo_rs"),
           deterministic=True, extra="scvelo_rs", external=True),  # fmt: skip
    Method("celldancer", "cellDancer: adata_to_df_with_embed on Mu/Ms, celldancer.velocity", _peer("celldancer"),
           external=True),  # fmt: skip
]
