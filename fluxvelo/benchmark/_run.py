"""``fv.benchmark.run``: every requested method on every requested dataset, several seeds, one table."""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._utils import progress_disabled
from ._datasets import SIMULATIONS, Prepared, canonical_name, default_datasets, prepare
from ._interface import DATASET_KEY, Method, MethodNotAvailable
from ._memory import Measure
from ._methods import METHODS
from ._report import write, write_atomic
from ._result import (
    EDGE_COLUMNS, FAILED, METHOD_NOT_AVAILABLE, NOT_AVAILABLE, OK, RUN_COLUMNS, SUMMARY_METRICS, BenchmarkResult,
)  # fmt: skip

logger = logging.getLogger("fluxvelo")

#: The methods run when none are named: fluxvelo's presets and scVelo's two modes (peers only on request).
DEFAULT_METHODS = ("fluxvelo", "fluxvelo_paper", "scvelo_stochastic", "scvelo_dynamical")


def _parse_methods(methods: str | Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(DEFAULT_METHODS)
    if isinstance(methods, str):
        methods = [m for m in methods.replace(" ", "").split(",") if m]
    names = list(dict.fromkeys(methods))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    return names


def _parse_seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {seeds}.")
        return list(range(int(seeds)))
    out = list(dict.fromkeys(int(s) for s in seeds))
    if not out:
        raise ValueError("Give at least one seed.")
    return out


def _versions() -> dict[str, str]:
    out = {}
    for name in ("fluxvelo", "scvelo", "scanpy", "anndata", "torch", "numpy"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:  # noqa: BLE001 - absent optional package
            out[name] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def _empty_row(prep_or_name, method: str, seed, status: str, reason: str) -> dict[str, Any]:
    row = dict.fromkeys(RUN_COLUMNS, np.nan)
    if isinstance(prep_or_name, Prepared):
        row.update(dataset=prep_or_name.name, kind=prep_or_name.kind, n_cells=prep_or_name.adata.n_obs,
                   n_genes=prep_or_name.adata.n_vars)  # fmt: skip
    else:
        row.update(dataset=prep_or_name[0], kind=prep_or_name[1])
    row.update(method=method, seed=seed, status=status, reason=reason, settings="", warnings="")
    return row


def _warning_text(caught: list[warnings.WarningMessage]) -> str:
    keep = [w for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))]
    texts = list(dict.fromkeys(f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in keep))
    return " | ".join(texts[:5]) + (f" | ... ({len(texts) - 5} more)" if len(texts) > 5 else "")


def _run_one(prep: Prepared, method: Method, seed: int, options: dict[str, Any]):
    """Fit one method on a copy of the preprocessed data, project it and score it."""
    from .. import metrics, tl
    from ._simulation import ground_truth_scores

    row = _empty_row(prep, method.name, seed, OK, "")
    work = prep.adata.copy()
    work.uns[DATASET_KEY] = {"dataset": prep.name, "cluster_key": prep.cluster_key, "basis": prep.basis}
    edges_df = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if method.needs and "python" not in options:
                importlib.import_module(method.needs)
        except ImportError as err:
            hint = f": pip install fluxvelo[{method.extra}]" if method.extra else ""
            row.update(status=METHOD_NOT_AVAILABLE, reason=f"needs {method.needs} ({err}){hint}")
            return row, None, None
        try:
            with Measure() as used:
                run_settings = method.fit(work, seed, dict(options))
            row.update(fit_time_s=used.seconds, peak_rss_mb=used.peak_mb, peak_rss_delta_mb=used.delta_mb)
            if "fit_time_s" in run_settings:  # measured inside the method's own process
                run_settings = {**run_settings, "wall_time_s": round(used.seconds, 2)}
                row["fit_time_s"] = float(run_settings.pop("fit_time_s"))
            if method.deterministic:
                run_settings = {**run_settings, "deterministic": "run once for all seeds"}
            row["settings"] = json.dumps(run_settings, default=str, sort_keys=True)
            start = time.perf_counter()
            tl.velocity_graph(work)
            tl.velocity_embedding(work, basis=prep.basis)
            row["project_time_s"] = time.perf_counter() - start
            cbc, edges_df = metrics.cross_boundary_correctness(
                work, cluster_key=prep.cluster_key, edges=prep.edges, basis=prep.basis
            )
            row["cbc"] = cbc
            row["consistency"] = metrics.consistency(work)
            row["in_cluster_coherence"] = metrics.in_cluster_coherence(work, cluster_key=prep.cluster_key)[0]
            if "true_velocity" in work.layers:
                row.update(ground_truth_scores(work)[0])
        except MethodNotAvailable as err:
            logger.warning("benchmark: %s on %s (seed %s): method not available: %s", method.name, prep.name, seed,
                           err)  # fmt: skip
            row.update(status=METHOD_NOT_AVAILABLE, reason=str(err))
            edges_df = None
        except Exception as err:  # noqa: BLE001 - one failed fit must not stop the benchmark
            logger.warning("benchmark: %s on %s (seed %s) failed: %s: %s", method.name, prep.name, seed,
                           type(err).__name__, err)  # fmt: skip
            row.update(status=FAILED, reason=f"{type(err).__name__}: {err}")
            edges_df = None
    row["warnings"] = _warning_text(caught)
    if edges_df is not None:
        edges_df = edges_df.reset_index().assign(dataset=prep.name, method=method.name, seed=seed)[EDGE_COLUMNS]
    return row, edges_df, (work if row["status"] == OK else None)


def _runs_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows of finished runs as the ``results.csv`` table."""
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for col in ["seed", "n_cells", "n_genes", "n_genes_compared"]:
        runs[col] = pd.to_numeric(runs[col]).astype("Int64")
    return runs


def _record_settings(config: dict[str, Any], rows: list[dict[str, Any]], start: float) -> None:
    """Put the elapsed time and, per method, the settings of its first successful run into ``config``."""
    config["seconds"] = round(time.perf_counter() - start, 1)
    for m in config["methods"]:
        done = [r["settings"] for r in rows if r["method"] == m and r["status"] == OK]
        config["methods"][m]["settings"] = json.loads(done[0]) if done else None


def _save_progress(out: Path | None, config: dict[str, Any], rows: list[dict[str, Any]], start: float) -> None:
    """Refresh ``results.csv`` and ``config.json`` in ``out`` with the runs finished so far (nothing when None)."""
    if out is None:
        return
    _record_settings(config, rows, start)
    write_atomic(out / "results.csv", _runs_table(rows))
    write_atomic(out / "config.json", config)


def _summarise(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (dataset, method), group in runs.groupby(["dataset", "method"], sort=False):
        ok = group[group["status"] == OK]
        row = {"dataset": dataset, "kind": group["kind"].iloc[0], "method": method}
        if ok.empty:
            row.update(status=group["status"].iloc[0], reason=group["reason"].iloc[0], n_runs=0, seeds="")
        else:
            failed = group[group["status"] != OK]
            row.update(status=OK, reason="; ".join(failed["reason"].astype(str)) if len(failed) else "",
                       n_runs=len(ok), seeds=",".join(str(int(s)) for s in ok["seed"]))  # fmt: skip
        for metric in SUMMARY_METRICS:
            values = pd.to_numeric(ok[metric], errors="coerce").dropna()
            row[f"{metric}_mean"] = values.mean() if len(values) else np.nan
            row[f"{metric}_sd"] = values.std(ddof=1) if len(values) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def run(
    datasets: Sequence[str] | None = None,
    *,
    methods: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] = 3,
    out: str | os.PathLike | None = None,
    paper_epochs: int | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    peer_python: dict[str, str | os.PathLike] | None = None,
    simulation_options: dict[str, Any] | None = None,
    download: bool = True,
    figure: bool = True,
    keep_adata: bool | str = "first",
) -> BenchmarkResult:
    """Run the velocity benchmark: every method on every dataset, several seeds, metrics in one table.

    For each dataset: load it (:func:`fluxvelo.datasets.load`, or a simulator), preprocess it once
    (:func:`fluxvelo.pp.recipe_flux`), then for each method and seed fit velocities on a copy of the
    preprocessed data, project them into the dataset's embedding (:func:`fluxvelo.tl.velocity_graph`,
    :func:`fluxvelo.tl.velocity_embedding`) and compute CBC on the annotated lineage edges (pooled and per
    edge), consistency and in-cluster coherence (:mod:`fluxvelo.metrics`). On simulations, the agreement with
    the true velocity is scored too (:func:`fluxvelo.benchmark.ground_truth_scores`). A dataset that cannot
    be found or downloaded gets rows with status ``'data not available'`` and the reason; a method that
    fails gets status ``'failed'``; neither stops the run.

    Fit time is the wall time of the velocity fit alone. Peak memory is the resident set size (RSS) of this
    process and its child processes, sampled every 20 ms during the fit (with psutil; ``getrusage`` without
    it), as the peak and as the excess over the RSS at the start of the fit.

    Parameters
    ----------
    datasets
        Registry names (:func:`fluxvelo.datasets.available`), ``'simulation'`` (:func:`fluxvelo.datasets.simulation`)
        or ``'scvelo_simulation'`` (:func:`fluxvelo.benchmark.scvelo_simulation`). Default: the paper's five,
        ``pancreas_2000`` and both simulations.
    methods
        Names from :data:`fluxvelo.benchmark.METHODS`, as a list or a comma-separated string: ``'fluxvelo'``
        (preset 'default'), ``'fluxvelo_paper'`` (preset 'paper'), ``'scvelo_stochastic'``,
        ``'scvelo_dynamical'``, the peers ``'velovi'``, ``'unitvelo'``, ``'scvelo_rs'``, ``'celldancer'``, or a
        method added with :func:`fluxvelo.benchmark.register_method`. Default: fluxvelo's two presets and
        scVelo's two modes. A peer that is not installed, or fails, gets status ``'method not available'``.
    seeds
        Number of seeds (``0 .. seeds-1``) or the seeds themselves. Deterministic methods run once.
    out
        Output folder for ``results.csv``, ``per_edge.csv``, ``summary.csv``, ``benchmark.md``,
        ``figure.png`` and ``config.json``; nothing is written when None. ``results.csv`` and ``config.json``
        are rewritten after each finished run, so a run that is stopped keeps the rows it finished
        (``config['complete']`` is False until the end).
    paper_epochs
        Epochs of ``fluxvelo_paper`` instead of the paper's 100 (about 4 min per pancreas fit on 2 CPU cores);
        recorded in the settings.
    method_options
        Extra keyword arguments per method, e.g. ``{'fluxvelo': {'epochs': 5, 'device': 'cpu'}}`` (passed to
        :func:`fluxvelo.tl.velocity`, ``scvelo.tl.velocity`` or ``scvelo.tl.recover_dynamics``) or
        ``{'velovi': {'max_epochs': 100}}`` (a peer's own option; each peer's adapter in
        :mod:`fluxvelo.benchmark._peer_fits` says which it takes). All are recorded in ``config.json``.
    peer_python
        Per peer, the Python executable of a separate environment to run it in, e.g.
        ``{'unitvelo': '/path/to/venv/bin/python'}``: the data go there and the velocity comes back through an
        ``.h5ad`` exchange in a temporary directory. Only for methods that can run elsewhere (``external``).
    simulation_options
        ``n_cells``, ``n_genes`` and ``random_state`` of the simulated datasets (default 1,000 cells, 100 genes
        for ``'simulation'`` and 50 for ``'scvelo_simulation'``, seed 0).
    download
        Allow downloads of datasets not found locally.
    figure
        Draw ``figure.png`` when ``out`` is given.
    keep_adata
        Keep the fitted AnnData of the first seed of each method (``'first'``, needed for the figure), of
        every seed (``'all'``), or none (False).

    Returns
    -------
    :class:`BenchmarkResult` with ``runs``, ``per_edge``, ``summary``, ``config``, ``adata`` and ``files``.
    """
    from tqdm.auto import tqdm

    names = list(dict.fromkeys(canonical_name(n) for n in (default_datasets() if datasets is None else datasets)))
    if not names:
        raise ValueError("No dataset given.")
    method_names = _parse_methods(methods)
    seed_list = _parse_seeds(seeds)
    if keep_adata not in (True, False, "first", "all"):
        raise ValueError(f"keep_adata must be 'first', 'all' or False, got {keep_adata!r}.")
    options = {m: {} for m in method_names}
    for m, opts in (method_options or {}).items():
        if m not in METHODS:
            raise ValueError(f"method_options names an unknown method {m!r}; choose from {', '.join(METHODS)}.")
        if m in options:
            options[m] = dict(opts)
    for m, python in (peer_python or {}).items():
        if m not in METHODS or not METHODS[m].external:
            runs_elsewhere = ", ".join(k for k, v in METHODS.items() if v.external)
            raise ValueError(f"peer_python names {m!r}, which cannot run in another environment; "
                             f"these can: {runs_elsewhere}.")  # fmt: skip
        if m in options:
            options[m]["python"] = str(python)
    if paper_epochs is not None:
        if int(paper_epochs) < 1:
            raise ValueError(f"paper_epochs must be at least 1, got {paper_epochs}.")
        if "fluxvelo_paper" in options:
            options["fluxvelo_paper"]["epochs"] = int(paper_epochs)
    plan = {m: seed_list[:1] if METHODS[m].deterministic else seed_list for m in method_names}

    config: dict[str, Any] = {
        "datasets": names,
        "methods": {m: {"description": METHODS[m].description, "options": options[m], "seeds": plan[m],
                        "deterministic": METHODS[m].deterministic} for m in method_names},  # fmt: skip
        "seeds": seed_list,
        "paper_epochs": paper_epochs,
        "simulation_options": dict(simulation_options or {}),
        "download": download,
        "memory": "peak RSS of this process and its children during the fit, sampled every 20 ms with psutil "
        "(getrusage ru_maxrss without psutil); peak_rss_delta_mb is the excess over the RSS at the fit's start",
        "fit_time": "wall time of the velocity fit alone (scVelo dynamical: recover_dynamics + velocity)",
        "preprocessing": {},
        "versions": _versions(),
        "machine": _machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    rows, edge_tables, kept = [], [], {}
    total = len(names) * sum(len(s) for s in plan.values())
    bar = tqdm(total=total, desc="benchmark", disable=progress_disabled(), leave=False, unit="run")
    start = time.perf_counter()
    try:
        for name in names:
            bar.set_postfix_str(f"{name}: preprocessing")
            try:
                prep = prepare(name, download=download, simulation_options=simulation_options)
            except Exception as err:  # noqa: BLE001 - a missing or broken dataset must not stop the others
                if isinstance(err, (FileNotFoundError, ImportError)):
                    status = NOT_AVAILABLE
                    reason = str(err) if isinstance(err, FileNotFoundError) else f"needs an optional package: {err}"
                else:
                    status, reason = FAILED, f"loading or preprocessing failed: {type(err).__name__}: {err}"
                logger.warning("benchmark: %s: %s: %s", name, status, reason)
                kind = "simulation" if name in SIMULATIONS else "real"
                rows += [_empty_row((name, kind), m, np.nan, status, reason) for m in method_names]
                config["preprocessing"][name] = {"status": status, "reason": reason}
                _save_progress(out, config, rows, start)
                bar.update(sum(len(plan[m]) for m in method_names))
                continue
            config["preprocessing"][name] = {
                "status": OK, "steps": prep.preprocessing, "seconds": round(prep.seconds, 2),
                "n_cells": prep.adata.n_obs, "n_genes": prep.adata.n_vars, "cluster_key": prep.cluster_key,
                "basis": prep.basis, "edges": [f"{a} -> {b}" for a, b in prep.edges], **prep.source,
            }  # fmt: skip
            for method in method_names:
                for i, seed in enumerate(plan[method]):
                    bar.set_postfix_str(f"{name}: {method} seed {seed}")
                    row, edges_df, adata = _run_one(prep, METHODS[method], seed, options[method])
                    rows.append(row)
                    if edges_df is not None:
                        edge_tables.append(edges_df)
                    if adata is not None and (keep_adata == "all" or (keep_adata in (True, "first") and i == 0)):
                        kept[(name, method, seed)] = adata
                    _save_progress(out, config, rows, start)
                    bar.update(1)
            del prep
    finally:
        bar.close()
    _record_settings(config, rows, start)
    config["complete"] = True

    runs = _runs_table(rows)
    per_edge = pd.concat(edge_tables, ignore_index=True) if edge_tables else pd.DataFrame(columns=EDGE_COLUMNS)
    for col in ["seed", "n_cells"]:
        per_edge[col] = pd.to_numeric(per_edge[col]).astype("Int64")
    result = BenchmarkResult(runs, per_edge, _summarise(runs), config, kept)
    if out is not None:
        result.files = write(result, out, figure=figure)
    return result
