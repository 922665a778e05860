"""Files of a benchmark run: the CSV tables, the Markdown report (:mod:`._result`), ``config.json`` and a figure."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from ._result import OK, BenchmarkResult, to_markdown

logger = logging.getLogger("fluxvelo")


def write_atomic(path: Path, data: pd.DataFrame | dict) -> None:
    """Write a table as CSV, or a dict as JSON, to ``path`` through a temporary file in the same folder.

    The temporary file replaces ``path`` only once it is complete, so a reader, or a run that is killed,
    never sees a half-written file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(), unlike mkstemp, keeps the umask's mode
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if isinstance(data, pd.DataFrame):
                data.to_csv(fh, index=False)
            else:
                fh.write(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    ok = result.summary[result.summary["status"] == OK]
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
    for kind, data in (("runs", result.runs), ("per_edge", result.per_edge), ("summary", result.summary),
                       ("config", result.config)):  # fmt: skip
        write_atomic(files[kind], data)
    if figure:
        try:
            fig = plot(result, path=out / "figure.png")
        except Exception as err:  # noqa: BLE001 - keep the numbers even if plotting breaks
            logger.warning("benchmark: the figure could not be drawn: %s: %s", type(err).__name__, err)
            fig = None
        if fig is not None:
            files["figure"] = out / "figure.png"
    result.files = files
    files["markdown"].write_text(to_markdown(result), encoding="utf-8")
    logger.info("benchmark: wrote %s", ", ".join(str(p) for p in files.values()))
    return files
