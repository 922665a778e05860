"""The peers' own calls, as their tutorials show them, on the benchmark's prepared AnnData.

Each ``fit_<peer>(adata, seed, options, *, cluster_key, basis, workdir)`` writes ``layers['velocity']`` over all
genes of ``adata`` (NaN for the genes the peer dropped) and ``var['velocity_genes']``, and returns the settings
it used, every deviation from the peer's default included.

This module imports nothing from fluxvelo, so that it also runs as a script with the Python of a peer's own
environment (the exchange of :mod:`fluxvelo.benchmark._external`)::

    python _peer_fits.py EXCHANGE_DIR

reads ``request.json`` and ``input.h5ad`` there and writes ``output.h5ad`` (``layers['velocity']``,
``var['velocity_genes']``) and ``result.json`` (settings, the peer's own fit time, versions), or ``error.json``
(``{"type", "message", "not_available"}``) and exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

#: Exit status of the script when the peer is not installed in that environment.
NOT_AVAILABLE_EXIT = 3


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - the distribution name may differ from the module's
        return str(getattr(sys.modules.get(module), "__version__", "unknown"))


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _write_velocity(adata, velocity: np.ndarray, genes) -> None:
    """Write the peer's velocity of ``genes`` into ``adata`` (all genes; NaN for the others)."""
    import pandas as pd

    index = pd.Index(adata.var_names).get_indexer(list(genes))
    if (index < 0).any():
        raise ValueError("the peer returned genes that are not in the input")
    full = np.full(adata.shape, np.nan, dtype=np.float32)
    full[:, index] = np.asarray(velocity, dtype=np.float32)
    mask = np.zeros(adata.n_vars, dtype=bool)
    mask[index] = np.isfinite(full[:, index]).all(0)
    adata.layers["velocity"] = full
    adata.var["velocity_genes"] = mask


@contextlib.contextmanager
def _quiet_scvelo():
    """scVelo's log level 0 while a peer calls it (veloVI and scvelo-rs do)."""
    import scvelo

    old = scvelo.settings.verbosity
    scvelo.settings.verbosity = 0
    try:
        yield
    finally:
        scvelo.settings.verbosity = old


@contextlib.contextmanager
def _global_random_state():
    """Restore Python's, NumPy's and torch's global random state after a peer that seeds them globally."""
    import random

    state_py, state_np = random.getstate(), np.random.get_state()
    torch = sys.modules.get("torch")
    state_torch = torch.random.get_rng_state() if torch is not None else None
    try:
        yield
    finally:
        random.setstate(state_py)
        np.random.set_state(state_np)
        if state_torch is not None:
            torch.random.set_rng_state(state_torch)


def fit_velovi(adata, seed: int, options: dict[str, Any], *, cluster_key: str, basis: str, workdir: Path) -> dict:
    """veloVI as its tutorial runs it: ``preprocess_data``, ``setup_anndata`` on Ms/Mu, ``train``, velocities.

    ``preprocess_data`` min-max scales Ms and Mu and keeps its own genes (positive deterministic-model R^2 and
    gamma, then scVelo's velocity genes); the others get NaN. The tutorial's velocity
    (``get_velocity(n_samples=25, velo_statistic='mean') / (20 / latent_time.max(0))``) is in min-max units; it
    is multiplied by each gene's range of Ms so that it is in the units of the shared ``Ms`` (``rescale=False``
    keeps the min-max units). Options: ``max_epochs`` (veloVI's default, 500, when absent), ``n_samples``
    (25), ``rescale`` (True), and anything else for ``VELOVI.train``.
    """
    import scvi
    import torch
    from velovi import VELOVI, preprocess_data

    opts = dict(options)
    n_samples = int(opts.pop("n_samples", 25))
    rescale = bool(opts.pop("rescale", True))
    ms = _dense(adata.layers["Ms"])
    span = ms.max(0) - ms.min(0)
    with _global_random_state(), _quiet_scvelo():
        scvi.settings.seed = int(seed)
        sub = preprocess_data(adata.copy())
        VELOVI.setup_anndata(sub, spliced_layer="Ms", unspliced_layer="Mu")
        model = VELOVI(sub)
        model.train(**opts)
        latent_time = model.get_latent_time(n_samples=n_samples)
        velocity = model.get_velocity(n_samples=n_samples, velo_statistic="mean")
    scaling = 20 / np.asarray(latent_time).max(0)
    v = np.asarray(velocity) / scaling
    genes = list(sub.var_names)
    if rescale:
        v = v * span[adata.var_names.get_indexer(genes)]
    _write_velocity(adata, v, genes)
    epochs = len(model.history["elbo_train"]) if "elbo_train" in model.history else None
    return {
        "calls": "preprocess_data; VELOVI.setup_anndata(spliced_layer='Ms', unspliced_layer='Mu'); train; "
        "get_latent_time / get_velocity(velo_statistic='mean') as in the tutorial",
        "max_epochs": opts.get("max_epochs", "veloVI default (500)"), "epochs_run": epochs,
        "train_options": {k: v for k, v in opts.items() if k != "max_epochs"}, "n_samples": n_samples,
        "genes_kept": len(genes), "genes_in": int(adata.n_vars), "rescaled_to_Ms_units": rescale,
        "device": "cuda" if torch.cuda.is_available() and opts.get("accelerator") != "cpu" else "cpu",
        "seed": f"scvi.settings.seed = {int(seed)}", "version": _version("velovi"),
        "scvi_tools": _version("scvi-tools"),
    }  # fmt: skip


def fit_scvelo_rs(adata, seed: int, options: dict[str, Any], *, cluster_key: str, basis: str, workdir: Path) -> dict:
    """scvelo-rs as its README shows it: ``import scvelo_rs as scv``, ``recover_dynamics``, ``velocity``.

    Options go to ``recover_dynamics`` (``n_jobs`` defaults to 2, as for scVelo's dynamical model here).
    """
    import scvelo_rs as scv

    opts = {"n_jobs": 2, **options}
    with _quiet_scvelo():
        scv.tl.recover_dynamics(adata, **opts)
        scv.tl.velocity(adata, mode="dynamical")
    fitted = int(np.isfinite(adata.var["fit_alpha"]).sum()) if "fit_alpha" in adata.var else None
    genes = int(np.asarray(adata.var["velocity_genes"]).sum()) if "velocity_genes" in adata.var else None
    return {"calls": "scvelo_rs.tl.recover_dynamics; scvelo_rs.tl.velocity(mode='dynamical')", **opts,
            "genes_fitted": fitted, "velocity_genes": genes, "version": _version("scvelo-rs")}  # fmt: skip


def fit_unitvelo(adata, seed: int, options: dict[str, Any], *, cluster_key: str, basis: str, workdir: Path) -> dict:
    """UniTVelo as its tutorial runs it on preprocessed data: ``run_model(adata, label, config_file, normalize=False)``.

    The configuration is UniTVelo's default ``Configuration()``; each option sets the attribute of the same name
    in upper case (``max_iter=1200`` sets ``MAX_ITER``). Without a GPU, ``GPU`` is set to -1 (the CPU). The
    seed goes to NumPy's and TensorFlow's global generators (UniTVelo has no seed of its own). UniTVelo writes a
    ``res/`` folder into the working directory, so it runs in ``workdir``.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "True")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import unitvelo as utv

    config = utv.config.Configuration()
    default = dict(vars(config))
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        config.GPU = -1
    for key, value in options.items():
        name = key.upper()
        if name not in default:
            raise ValueError(f"UniTVelo's Configuration has no {name!r}")
        setattr(config, name, value)
    np.random.seed(int(seed))
    tf.random.set_seed(int(seed))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        out = utv.run_model(adata.copy(), cluster_key, config_file=config, normalize=False)
    finally:
        os.chdir(cwd)
    v = _dense(out.layers["velocity"])
    keep = np.asarray(out.var["velocity_genes"], dtype=bool) if "velocity_genes" in out.var else np.isfinite(v).all(0)
    _write_velocity(adata, v[:, keep], out.var_names[keep])
    changed = {k: v for k, v in vars(config).items() if default.get(k) != v}
    return {"calls": "unitvelo.run_model(adata, label, config_file=Configuration(), normalize=False)",
            "label": cluster_key, "config_changed": changed, "genes_kept": int(keep.sum()),
            "genes_in": int(adata.n_vars), "device": "gpu" if gpus else "cpu",
            "seed": f"np.random.seed / tf.random.set_seed({int(seed)})", "version": _version("unitvelo"),
            "tensorflow": tf.__version__}  # fmt: skip


def fit_celldancer(adata, seed: int, options: dict[str, Any], *, cluster_key: str, basis: str, workdir: Path) -> dict:
    """cellDancer as its tutorial runs it: ``adata_to_df_with_embed`` on Mu/Ms, then ``celldancer.velocity``.

    The velocity of a gene in a cell is cellDancer's predicted step, ``splice_predict - splice``, the quantity its
    ``compute_cell_velocity`` projects; with ``norm_u_s`` (its default) it is multiplied by the gene's maximum of
    Ms to return to the units of the shared ``Ms``. Options go to ``celldancer.velocity`` (``n_jobs`` defaults
    to 2 here). cellDancer seeds torch itself; the seed goes to torch's and NumPy's global generators.
    """
    # cellDancer loads its own shipped initial networks with torch.load, which torch >= 2.6 refuses by default.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import celldancer as cd
    import celldancer.utilities as cdutil
    import pandas as pd
    import torch

    opts = {"n_jobs": 2, **options}
    torch.manual_seed(int(seed))
    np.random.seed(int(seed))
    table = cdutil.adata_to_df_with_embed(adata, us_para=["Mu", "Ms"], cell_type_para=cluster_key,
                                          embed_para=f"X_{basis}", save_path=str(workdir / "cell_type_u_s.csv"))  # fmt: skip
    _, result = cd.velocity(table, save_path=str(workdir), **opts)
    result = result.assign(step=result["splice_predict"] - result["splice"])
    wide = result.pivot_table(index="cellIndex", columns="gene_name", values="step", aggfunc="first")
    genes = [g for g in adata.var_names if g in wide.columns]
    v = wide.reindex(index=np.arange(adata.n_obs), columns=genes).to_numpy(dtype=np.float64)
    if opts.get("norm_u_s", True):
        ms = pd.DataFrame(_dense(adata.layers["Ms"]), columns=adata.var_names)[genes]
        v = v * ms.max(0).to_numpy()
    _write_velocity(adata, v, genes)
    return {"calls": "celldancer.utilities.adata_to_df_with_embed(us_para=['Mu', 'Ms']); celldancer.velocity",
            **opts, "genes_kept": len(genes), "genes_in": int(adata.n_vars),
            "seed": f"torch.manual_seed / np.random.seed({int(seed)})", "version": _version("celldancer"),
            "torch_load": "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (its shipped initial networks)"}  # fmt: skip


#: The peers' fit functions, by benchmark name, and the package each imports.
FITS = {"velovi": fit_velovi, "scvelo_rs": fit_scvelo_rs, "unitvelo": fit_unitvelo, "celldancer": fit_celldancer}
PACKAGES = {"velovi": "velovi", "scvelo_rs": "scvelo_rs", "unitvelo": "unitvelo", "celldancer": "celldancer"}


def main(exchange: str) -> int:
    """Run one peer fit over the files in ``exchange`` (see the module's docstring); return the exit status."""
    folder = Path(exchange)
    try:
        request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
        name = request["method"]
        fit = FITS.get(name) or _script_fit(request)
        package = request["package"] if "package" in request else PACKAGES.get(name, name)
        try:
            if package:
                __import__(package)
        except ImportError as err:
            (folder / "error.json").write_text(json.dumps(
                {"type": type(err).__name__, "message": f"{err} (in {sys.executable})", "not_available": True}))  # fmt: skip
            return NOT_AVAILABLE_EXIT
        import anndata

        adata = anndata.read_h5ad(folder / "input.h5ad")
        work = folder / "work"
        work.mkdir(exist_ok=True)
        start = time.perf_counter()
        settings = fit(adata, int(request["seed"]), dict(request.get("options") or {}),
                       cluster_key=request["cluster_key"], basis=request["basis"], workdir=work)  # fmt: skip
        seconds = time.perf_counter() - start
        out = anndata.AnnData(obs=adata.obs[[]], var=adata.var[["velocity_genes"]].astype(bool))
        out.layers["velocity"] = np.asarray(adata.layers["velocity"], dtype=np.float32)
        out.write_h5ad(folder / "output.h5ad")
        result = {"settings": settings, "fit_time_s": seconds, "python": sys.executable,
                  "versions": {"anndata": anndata.__version__, "numpy": np.__version__}}  # fmt: skip
        (folder / "result.json").write_text(json.dumps(result, default=str), encoding="utf-8")
        return 0
    except Exception as err:  # noqa: BLE001 - reported to the harness, which writes the row
        (folder / "error.json").write_text(json.dumps(
            {"type": type(err).__name__, "message": str(err), "not_available": False,
             "traceback": traceback.format_exc()[-4000:]}))  # fmt: skip
        return 1


def _script_fit(request: dict):
    """A fit function ``fit_<method>`` from the file ``request['script']`` (a user's own peer)."""
    import importlib.util

    script = request.get("script")
    if not script:
        raise ValueError(f"unknown peer {request['method']!r} and no script given")
    spec = importlib.util.spec_from_file_location("fluxvelo_peer_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, f"fit_{request['method']}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
