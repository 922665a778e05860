"""A method in a separate Python environment: an ``.h5ad`` exchange in a temporary directory.

The harness writes the prepared AnnData's counts, moments, graph, clusters and embedding to ``input.h5ad`` and
the request (method, seed, options, cluster key, basis) to ``request.json``; the other environment's Python runs
:mod:`fluxvelo.benchmark._peer_fits` as a script on that folder and leaves ``output.h5ad`` (the velocity over
all genes, NaN where it has none, and ``var['velocity_genes']``) and ``result.json``. Only the velocity comes
back; everything else the peer computed stays in the temporary directory, which is removed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from . import _peer_fits
from ._interface import MethodNotAvailable

logger = logging.getLogger("fluxvelo")

#: The script the other environment runs.
PEER_SCRIPT = Path(_peer_fits.__file__)


def exchange_input(adata: AnnData, *, cluster_key: str, basis: str) -> AnnData:
    """The part of the prepared AnnData that goes to the other environment.

    Counts (``X``, ``spliced``, ``unspliced``), moments (``Ms``, ``Mu``), the kNN graph (``obsp``,
    ``uns['neighbors']``), the clusters (``obs[cluster_key]``, as plain strings in a categorical) and the
    embeddings in ``obsm``; plain string indices, so that an older anndata reads it.
    """
    obs = pd.DataFrame(index=pd.Index([str(i) for i in adata.obs_names], dtype=object))
    if cluster_key in adata.obs:
        obs[cluster_key] = pd.Categorical(adata.obs[cluster_key].astype(str).to_numpy())
    var = pd.DataFrame(index=pd.Index([str(g) for g in adata.var_names], dtype=object))
    layers = {k: adata.layers[k] for k in ("spliced", "unspliced", "Ms", "Mu") if k in adata.layers}
    out = AnnData(X=adata.X, obs=obs, var=var, layers=layers)
    for key, value in adata.obsm.items():
        if key.startswith("X_"):
            out.obsm[key] = np.asarray(value)
    for key in ("distances", "connectivities"):
        if key in adata.obsp:
            out.obsp[key] = adata.obsp[key]
    if "neighbors" in adata.uns:
        params = dict(adata.uns["neighbors"].get("params", {}))
        out.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                                "params": {k: v for k, v in params.items() if isinstance(v, (str, int, float))}}  # fmt: skip
    if f"X_{basis}" not in out.obsm:
        logger.warning("exchange: the embedding X_%s is missing from the prepared AnnData", basis)
    return out


def run_external(
    python: str | os.PathLike,
    method: str,
    adata: AnnData,
    seed: int,
    options: dict[str, Any],
    *,
    cluster_key: str,
    basis: str,
    package: str | None = None,
    script: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Fit ``method`` with another environment's ``python`` and write its velocity into ``adata``.

    Parameters
    ----------
    python
        That environment's Python executable (e.g. ``/path/to/venv/bin/python``).
    method
        A peer of :data:`fluxvelo.benchmark._peer_fits.FITS`, or the ``<name>`` of a function ``fit_<name>`` in
        ``script``.
    adata
        The prepared AnnData; gets ``layers['velocity']`` and ``var['velocity_genes']``.
    seed, options
        Passed to the fit.
    cluster_key, basis
        The dataset's clusters and embedding.
    package
        The package to import first in that environment (a missing one means ``'method not available'``); by
        default the peer's own.
    script
        A Python file with a function ``fit_<method>(adata, seed, options, *, cluster_key, basis, workdir)``.
    timeout
        Seconds before the other process is stopped.

    Returns
    -------
    The settings the peer reported, with ``python``, ``fit_time_s`` (the peer's own fit, measured in that
    process) and ``exchange_time_s`` (everything else: writing, starting and reading back).

    Raises
    ------
    MethodNotAvailable
        The executable is missing, the package is not installed there, or the fit failed (with the reason).
    """
    exe = Path(python).expanduser()
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise MethodNotAvailable(f"the Python of {method}'s environment, {exe}, is not an executable file")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"fluxvelo-{method}-") as tmp:
        folder = Path(tmp)
        exchange_input(adata, cluster_key=cluster_key, basis=basis).write_h5ad(folder / "input.h5ad")
        request = {"method": method, "seed": int(seed), "options": options, "cluster_key": cluster_key,
                   "basis": basis}  # fmt: skip
        if script is not None:
            request["script"] = str(Path(script).resolve())
        if package is not None or script is not None:
            request["package"] = package
        (folder / "request.json").write_text(json.dumps(request, default=str), encoding="utf-8")
        env = {**os.environ, "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)  # the other environment must not see this one's packages
        try:
            proc = subprocess.run([str(exe), str(PEER_SCRIPT), str(folder)], capture_output=True, text=True,
                                  timeout=timeout, env=env, cwd=folder)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise MethodNotAvailable(f"{method} in {exe} did not finish within {timeout} s") from err
        if proc.returncode != 0:
            raise MethodNotAvailable(_failure(method, exe, proc, folder))
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        import anndata

        out = anndata.read_h5ad(folder / "output.h5ad")
    if list(out.obs_names) != [str(i) for i in adata.obs_names] or list(out.var_names) != [str(g) for g in adata.var_names]:
        raise MethodNotAvailable(f"{method} in {exe} returned cells or genes that differ from the input")
    adata.layers["velocity"] = np.asarray(out.layers["velocity"], dtype=np.float32)
    adata.var["velocity_genes"] = np.asarray(out.var["velocity_genes"], dtype=bool)
    wall = time.perf_counter() - start
    return {**result["settings"], "python": str(exe), "fit_time_s": float(result["fit_time_s"]),
            "exchange_time_s": round(wall - float(result["fit_time_s"]), 2),
            "peer_env": result.get("versions", {})}  # fmt: skip


def _failure(method: str, exe: Path, proc: subprocess.CompletedProcess, folder: Path) -> str:
    error_file = folder / "error.json"
    if error_file.is_file():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        what = "is not installed in" if error.get("not_available") else "failed in"
        if error.get("traceback"):
            logger.info("%s failed in %s:\n%s", method, exe, error["traceback"])
        return f"{method} {what} {exe}: {error['type']}: {error['message']}"
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return f"{method} in {exe} exited with status {proc.returncode}: {' / '.join(tail)[:500]}"
