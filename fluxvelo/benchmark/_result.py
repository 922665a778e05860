"""The result of a benchmark run and its text form: status values, table columns, the Markdown report.

Both :mod:`._run` (which fills a :class:`BenchmarkResult`) and :mod:`._report` (which writes it to files)
import from here; nothing here imports either of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

OK = "ok"
NOT_AVAILABLE = "data not available"
METHOD_NOT_AVAILABLE = "method not available"
FAILED = "failed"

#: Columns of :attr:`BenchmarkResult.runs` (one row per dataset, method and seed).
RUN_COLUMNS = [
    "dataset", "kind", "method", "seed", "status", "reason", "n_cells", "n_genes",
    "fit_time_s", "peak_rss_mb", "peak_rss_delta_mb", "project_time_s",
    "cbc", "consistency", "in_cluster_coherence", "velocity_cosine", "sign_accuracy", "n_genes_compared",
    "settings", "warnings",
]  # fmt: skip
#: Columns of :attr:`BenchmarkResult.per_edge`.
EDGE_COLUMNS = ["dataset", "method", "seed", "edge", "source", "target", "cbc", "n_cells"]
#: Numbers summarised over seeds (mean and sd) in :attr:`BenchmarkResult.summary`.
SUMMARY_METRICS = [
    "cbc", "consistency", "in_cluster_coherence", "velocity_cosine", "sign_accuracy",
    "fit_time_s", "peak_rss_mb", "peak_rss_delta_mb", "project_time_s",
]  # fmt: skip

@dataclass
class BenchmarkResult:
    """Everything one benchmark run measured.

    Attributes
    ----------
    runs
        One row per dataset, method and seed (:data:`RUN_COLUMNS`). ``status`` is ``'ok'``, ``'data not
        available'``, ``'method not available'`` or ``'failed'``, with the reason in ``reason``. A
        deterministic method (scVelo's) runs once, with the first seed.
    per_edge
        Per-edge CBC of every successful run (:data:`EDGE_COLUMNS`).
    summary
        Per dataset and method: ``status``, ``reason``, ``n_runs``, and ``<metric>_mean`` / ``<metric>_sd``
        (sample sd over seeds; NaN for a single run) for each of :data:`SUMMARY_METRICS`.
    config
        What was run: datasets with their preprocessing, methods with the settings actually used, seeds,
        versions, machine, and what the memory numbers measure.
    adata
        The fitted AnnData of each (dataset, method, seed) that was kept (see ``keep_adata``).
    files
        Paths written, by kind (``'runs'``, ``'per_edge'``, ``'summary'``, ``'markdown'``, ``'figure'``,
        ``'config'``); empty when no output folder was given.
    """

    runs: pd.DataFrame
    per_edge: pd.DataFrame
    summary: pd.DataFrame
    config: dict[str, Any]
    adata: dict[tuple[str, str, int], AnnData] = field(default_factory=dict, repr=False)
    files: dict[str, Path] = field(default_factory=dict)

    def per_edge_summary(self) -> pd.DataFrame:
        """Per-edge CBC per dataset, method and edge: mean and sd over seeds, and the seed count."""
        if self.per_edge.empty:
            return pd.DataFrame(columns=["dataset", "method", "edge", "cbc_mean", "cbc_sd", "n_runs"])
        grouped = self.per_edge.groupby(["dataset", "method", "edge"], sort=False)["cbc"]
        return grouped.agg(cbc_mean="mean", cbc_sd="std", n_runs="count").reset_index()

    def to_markdown(self) -> str:
        """The report as Markdown (see :func:`fluxvelo.benchmark.to_markdown`)."""
        return to_markdown(self)

    def table(self) -> str:
        """The main table (CBC / consistency, dataset x method) as Markdown."""
        return main_table(self)


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(mean: float, sd: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if not np.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _cell(summary_row: pd.Series, metric: str, digits: int = 3) -> str:
    if summary_row["status"] != OK:
        return str(summary_row["status"])
    return _fmt(summary_row[f"{metric}_mean"], summary_row[f"{metric}_sd"], digits)


def _metric_table(result: BenchmarkResult, metric: str, *, kinds=("real", "simulation"), mean_row: bool = True,
                  digits: int = 3) -> str:  # fmt: skip
    s = result.summary
    methods = list(result.config["methods"])
    datasets = [d for d in result.config["datasets"] if (s["dataset"] == d).any() and
                s.loc[s["dataset"] == d, "kind"].iloc[0] in kinds]  # fmt: skip
    rows = []
    for d in datasets:
        label = d if s.loc[s["dataset"] == d, "kind"].iloc[0] == "real" else f"{d} (simulated)"
        cells = []
        for m in methods:
            hit = s[(s["dataset"] == d) & (s["method"] == m)]
            cells.append(_cell(hit.iloc[0], metric, digits) if len(hit) else "")
        rows.append([label, *cells])
    if mean_row:
        real = s[(s["kind"] == "real") & (s["status"] == OK)]
        cells = []
        for m in methods:
            values = real.loc[real["method"] == m, f"{metric}_mean"].dropna()
            cells.append(f"{values.mean():.{digits}f} ({len(values)})" if len(values) else "n/a")
        rows.append(["**mean over real datasets** (n)", *cells])
    return _md(["dataset", *methods], rows)


def main_table(result: BenchmarkResult) -> str:
    """CBC and consistency, dataset x method (mean ± sd over seeds), with the mean over real datasets."""
    return (
        "### Cross-boundary correctness (CBC, pooled over edges)\n\n"
        + _metric_table(result, "cbc")
        + "\n\n### Consistency\n\n"
        + _metric_table(result, "consistency")
    )


def _edge_tables(result: BenchmarkResult) -> str:
    table = result.per_edge_summary()
    if table.empty:
        return "No per-edge results."
    methods = list(result.config["methods"])
    parts = []
    for d in dict.fromkeys(table["dataset"]):
        sub = table[table["dataset"] == d]
        rows = []
        for edge in dict.fromkeys(sub["edge"]):
            cells = []
            for m in methods:
                hit = sub[(sub["edge"] == edge) & (sub["method"] == m)]
                cells.append(_fmt(hit["cbc_mean"].iloc[0], hit["cbc_sd"].iloc[0], 2) if len(hit) else "")
            rows.append([edge, *cells])
        parts.append(f"**{d}**\n\n" + _md(["edge", *methods], rows))
    return "\n\n".join(parts)


def _cost_table(result: BenchmarkResult) -> str:
    s = result.summary[result.summary["status"] == OK]
    rows = [[r.dataset, r.method, str(r.n_runs), _fmt(r.fit_time_s_mean, r.fit_time_s_sd, 1),
             _fmt(r.peak_rss_mb_mean, r.peak_rss_mb_sd, 0), _fmt(r.peak_rss_delta_mb_mean, r.peak_rss_delta_mb_sd, 0),
             _fmt(r.project_time_s_mean, r.project_time_s_sd, 2)] for r in s.itertuples()]  # fmt: skip
    header = ["dataset", "method", "runs", "fit time (s)", "peak RSS (MiB)", "RSS added by the fit (MiB)",
              "graph + projection (s)"]  # fmt: skip
    return _md(header, rows) if rows else "No successful runs."


def _settings_text(result: BenchmarkResult) -> str:
    lines = []
    for m, info in result.config["methods"].items():
        used = info.get("settings")
        shown = json.dumps(used, sort_keys=True) if used else "(no successful run)"
        extra = ""
        if m == "fluxvelo_paper" and used and used.get("epochs") is not None and int(used["epochs"]) < 100:
            extra = f" **Shortened:** {used['epochs']} epoch(s) instead of the paper's 100 ({used.get('n_steps')} steps)."
        lines.append(f"- `{m}`: {info['description']}; seeds {info['seeds']}. Settings used: `{shown}`.{extra}")
    for d, info in result.config["preprocessing"].items():
        if info.get("status") == OK:
            lines.append(f"- dataset `{d}`: {info['n_cells']} cells x {info['n_genes']} genes after "
                         f"preprocessing ({info['steps']}; {info['seconds']} s); clusters `{info['cluster_key']}`, "
                         f"basis `{info['basis']}`, edges: {'; '.join(info['edges'])}.")  # fmt: skip
    return "\n".join(lines)


def problems(result: BenchmarkResult) -> str:
    """One Markdown bullet per unavailable dataset and per failed (dataset, method), with the reason."""
    bad = result.runs[result.runs["status"] != OK]
    if bad.empty:
        return "None."
    seen = dict.fromkeys(
        (r.dataset, r.status, str(r.reason)) if r.status == NOT_AVAILABLE else (f"{r.dataset} / {r.method}", r.status, str(r.reason))
        for r in bad.itertuples()
    )  # fmt: skip
    return "\n".join(f"- {what}: **{status}**: {reason}" for what, status, reason in seen)


def to_markdown(result: BenchmarkResult) -> str:
    """The full report: main table, coherence, ground truth, per-edge CBC, cost, what was run, problems.

    Parameters
    ----------
    result
        Output of :func:`fluxvelo.benchmark.run`.

    Returns
    -------
    Markdown text.
    """
    cfg = result.config
    machine = cfg["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in cfg["versions"].items())
    parts = [
        "# fluxvelo benchmark",
        f"Run {cfg['started']}, {cfg['seconds']} s on {machine['cpu_count']} CPU(s) (torch threads "
        f"{machine['torch_threads']}, CUDA {machine['cuda']}); {versions}. Seeds {cfg['seeds']}; values are "
        "mean ± sd over seeds (sample sd); deterministic methods (scVelo) run once, shown without sd.",
        main_table(result),
        "### In-cluster coherence\n\n" + _metric_table(result, "in_cluster_coherence"),
    ]
    if (result.summary["kind"] == "simulation").any():
        gt = ["### Ground truth (simulations)",
              "Cosine between estimated and true velocity per cell (mean over cells), sign accuracy per gene "
              "(mean over genes), and CBC on the true lineage edges."]  # fmt: skip
        for metric, title in (("velocity_cosine", "velocity cosine"), ("sign_accuracy", "sign accuracy"),
                              ("cbc", "CBC on the true edges")):  # fmt: skip
            gt.append(f"**{title}**\n\n" + _metric_table(result, metric, kinds=("simulation",), mean_row=False))
        parts.append("\n\n".join(gt))
    parts += [
        "### Per-edge CBC\n\n" + _edge_tables(result),
        "### Fit time and memory\n\n" + cfg["fit_time"] + ". Memory: " + cfg["memory"] + ".\n\n" + _cost_table(result),
        "### What was run\n\n" + _settings_text(result),
        "### Not available or failed\n\n" + problems(result),
    ]
    if "figure" in result.files:
        parts.insert(3, f"![per-edge CBC and stream plots]({result.files['figure'].name})")
    return "\n\n".join(parts) + "\n"
