"""Outputs of a benchmark run: CSV files, a Markdown report shaped like the paper's table, and a figure."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from ._run import BenchmarkResult

logger = logging.getLogger("fluxvelo")


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(mean: float, sd: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if not np.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _cell(summary_row: pd.Series, metric: str, digits: int = 3) -> str:
    if summary_row["status"] != "ok":
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
        real = s[(s["kind"] == "real") & (s["status"] == "ok")]
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
    s = result.summary[result.summary["status"] == "ok"]
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
        if info.get("status") == "ok":
            lines.append(f"- dataset `{d}`: {info['n_cells']} cells x {info['n_genes']} genes after "
                         f"preprocessing ({info['steps']}; {info['seconds']} s); clusters `{info['cluster_key']}`, "
                         f"basis `{info['basis']}`, edges: {'; '.join(info['edges'])}.")  # fmt: skip
    return "\n".join(lines)


def problems(result: BenchmarkResult) -> str:
    """One Markdown bullet per unavailable dataset and per failed (dataset, method), with the reason."""
    bad = result.runs[result.runs["status"] != "ok"]
    if bad.empty:
        return "None."
    seen = dict.fromkeys(
        (r.dataset, r.status, str(r.reason)) if r.status == "data not available" else (f"{r.dataset} / {r.method}", r.status, str(r.reason))
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


def plot(result: BenchmarkResult, *, path: str | Path | None = None):
    """Per dataset, one row: per-edge CBC bars of all methods, then a stream plot per method (first seed).

    Uses :func:`fluxvelo.pl.cbc_bars` and :func:`fluxvelo.pl.velocity_embedding_stream`; a panel that cannot be
    drawn says why in its place.

    Parameters
    ----------
    result
        Output of :func:`fluxvelo.benchmark.run` (with the fitted AnnData kept).
    path
        File to save to; not saved when None.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`, or None when no dataset has a successful run.
    """
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        import matplotlib.pyplot as plt

        plt.switch_backend("Agg")
    import matplotlib.pyplot as plt

    from .. import pl

    cbc_bars = getattr(pl, "cbc_bars", None)
    stream = getattr(pl, "velocity_embedding_stream", None)
    missing = [n for n, f in (("cbc_bars", cbc_bars), ("velocity_embedding_stream", stream)) if f is None]
    if missing:
        logger.warning("benchmark figure: fluxvelo.pl has no %s yet; those panels are left blank.", ", ".join(missing))

    methods = list(result.config["methods"])
    ok = result.summary[result.summary["status"] == "ok"]
    datasets = [d for d in result.config["datasets"] if (ok["dataset"] == d).any()]
    if not datasets:
        return None
    edges = result.per_edge_summary()
    ncol = 1 + len(methods)
    fig, axes = plt.subplots(len(datasets), ncol, figsize=(4.2 * ncol + 2.0, 4.2 * len(datasets)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1.0] * len(methods)})  # fmt: skip

    def blank(ax, text):
        ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
        ax.set_axis_off()

    for row, d in enumerate(datasets):
        ax = axes[row, 0]
        bars = {}
        for m in methods:
            sub = edges[(edges["dataset"] == d) & (edges["method"] == m)]
            hit = ok[(ok["dataset"] == d) & (ok["method"] == m)]
            if len(sub) and len(hit):
                bars[m] = (float(hit["cbc_mean"].iloc[0]), sub.set_index("edge")[["cbc_mean"]].rename(columns={"cbc_mean": "cbc"}))
        if cbc_bars is None:
            blank(ax, "per-edge CBC: fluxvelo.pl.cbc_bars is not available yet")
        elif not bars:
            blank(ax, "no per-edge CBC")
        else:
            try:
                cbc_bars(bars, ax=ax, title=f"{d}: per-edge CBC (mean over seeds)", show=False)
            except Exception as err:  # noqa: BLE001 - a plot must not lose the numbers
                blank(ax, f"cbc_bars failed: {type(err).__name__}: {err}")
        for col, m in enumerate(methods, start=1):
            ax = axes[row, col]
            adatas = [a for (dd, mm, _), a in result.adata.items() if dd == d and mm == m]
            hit = ok[(ok["dataset"] == d) & (ok["method"] == m)]
            if stream is None:
                blank(ax, f"{m}: fluxvelo.pl.velocity_embedding_stream is not available yet")
            elif not adatas or not len(hit):
                status = result.summary[(result.summary["dataset"] == d) & (result.summary["method"] == m)]
                blank(ax, f"{m}: {status['status'].iloc[0] if len(status) else 'not run'}")
            else:
                adata = adatas[0]
                key = result.config["preprocessing"][d]
                title = f"{m}\nCBC {hit['cbc_mean'].iloc[0]:.3f}, consistency {hit['consistency_mean'].iloc[0]:.3f}"
                try:
                    stream(adata, basis=key["basis"], color=key["cluster_key"], ax=ax, show=False, title=title,
                           legend_loc="on data" if col == 1 else None, legend_fontsize=6)  # fmt: skip
                except Exception as err:  # noqa: BLE001
                    blank(ax, f"{m}: stream plot failed: {type(err).__name__}: {err}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def write(result: BenchmarkResult, out: Path, *, figure: bool = True) -> dict[str, Path]:
    """Write the CSV files, the Markdown report, ``config.json`` and (optionally) the figure into ``out``.

    Parameters
    ----------
    result
        Output of :func:`fluxvelo.benchmark.run`.
    out
        Output folder (created).
    figure
        Also draw ``figure.png``.

    Returns
    -------
    Paths by kind: ``'runs'`` (results.csv), ``'per_edge'`` (per_edge.csv), ``'summary'`` (summary.csv),
    ``'markdown'`` (benchmark.md), ``'config'`` (config.json) and ``'figure'`` (figure.png, when drawn).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "runs": out / "results.csv",
        "per_edge": out / "per_edge.csv",
        "summary": out / "summary.csv",
        "markdown": out / "benchmark.md",
        "config": out / "config.json",
    }
    result.runs.to_csv(files["runs"], index=False)
    result.per_edge.to_csv(files["per_edge"], index=False)
    result.summary.to_csv(files["summary"], index=False)
    files["config"].write_text(json.dumps(result.config, indent=2, default=str))
    if figure:
        try:
            fig = plot(result, path=out / "figure.png")
        except Exception as err:  # noqa: BLE001 - keep the numbers even if plotting breaks
            logger.warning("benchmark: the figure could not be drawn: %s: %s", type(err).__name__, err)
            fig = None
        if fig is not None:
            files["figure"] = out / "figure.png"
    result.files = files
    files["markdown"].write_text(to_markdown(result))
    logger.info("benchmark: wrote %s", ", ".join(str(p) for p in files.values()))
    return files
