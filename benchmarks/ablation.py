"""Ablation of fluxvelo's velocity settings on pancreas and three ground-truth simulations.

Each variant changes the default preset in one respect; every variant runs on the same preprocessed data
(the benchmark harness, ``fluxvelo.benchmark.run``) with several seeds. Prints a Markdown table of CBC,
consistency and, on the simulations, the cosine to the true velocity (mean ± sd over seeds).

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/ablation.py --seeds 3 --out ablation/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

import fluxvelo as fv
from fluxvelo.benchmark import Method, register_method

#: One change at a time against the default preset (fluxvelo.tl.PRESETS['default']).
VARIANTS: dict[str, dict] = {
    "default": {},
    "read at the smoothed states as given (no shared axes)": {"state_rank": False},
    "each gene's splicing clock (no shared clock)": {"shared_clock": False},
    "the fitted ratio (no steady-state ratio)": {"steady_state_ratio": False},
    "steady-state ratio 0.5": {"steady_state_ratio": 0.5},
    "no turnover (0.1.0's free fit)": {"turnover": False},
    "turnover, fit not balanced": {"balance": False},
    "turnover rate 0.005 (the true turnover's choice)": {"turnover_rate": 0.005},
    "turnover rate 0.02": {"turnover_rate": 0.02},
    "velocity genes by the fitted line": {"velocity_genes": "fit"},
    "no gene scaling, sigma2 1e-3 (paper's inputs)": {"gene_scale": False, "sigma2": 1e-3},
    "gene_scale 1, sigma2 0.04": {"gene_scale": 1.0, "sigma2": 0.04},
    "gene_scale 3, sigma2 0.36": {"gene_scale": 3.0, "sigma2": 0.36},
    "gene_scale 30, sigma2 36": {"gene_scale": 30.0, "sigma2": 36.0},
    "sigma2 1 (sigma = 0.1 gene sd)": {"sigma2": 1.0},
    "sigma2 16 (sigma = 0.4 gene sd)": {"sigma2": 16.0},
    "batch 256, 30 steps (same kernel work)": {"batch_size": 256, "n_steps": 30},
    "40 steps": {"n_steps": 40},
    "400 steps": {"n_steps": 400},
    "all fitted genes are velocity genes": {"min_r2": False},
    "fit's own time unit": {"time_unit": "diffusion"},
    "linear field (constant transcription)": {"field": "linear"},
    "horizon 1 (short rollouts)": {"horizon": 1.0},
    "horizon 16 (long rollouts)": {"horizon": 16.0},
    "1 rollout sub-step": {"n_substeps": 1},
    "batch 128, 60 steps (same cells seen)": {"batch_size": 128, "n_steps": 60},
    "mean of 3 fits (ensemble over seeds)": {"ensemble": 3},
}


def _ensemble_fit(adata, seed: int, options: dict) -> dict:
    """The mean velocity of several default fits with different seeds; velocity genes by majority."""
    n = options.pop("ensemble")
    fits = []
    for k in range(n):
        work = adata.copy()
        fv.tl.velocity(work, random_state=seed * n + k, **options)
        fits.append(work)
    adata.layers["velocity"] = np.mean([f.layers["velocity"] for f in fits], axis=0)
    adata.var["velocity_genes"] = np.mean([f.var["velocity_genes"] for f in fits], axis=0) > 0.5
    return {"ensemble": n, "seeds": [seed * n + k for k in range(n)], **options}


register_method(Method("fluxvelo_ensemble", "mean of several fluxvelo fits", _ensemble_fit), replace=True)


def render(table: pd.DataFrame, names: list[str]) -> str:
    """Markdown table: one row per variant, mean ± sd over seeds; metrics that no dataset has are left out."""
    datasets = list(dict.fromkeys(table["dataset"]))

    def cell(variant: str, dataset: str, metric: str) -> str:
        row = table[(table.variant == variant) & (table.dataset == dataset)].iloc[0]
        mean, sd = row.get(f"{metric}_mean"), row.get(f"{metric}_sd")
        return "" if pd.isna(mean) else f"{mean:.3f}" + ("" if pd.isna(sd) else f" ± {sd:.3f}")

    columns = [(d, m, label) for d in datasets for m, label in
               (("cbc", "CBC"), ("consistency", "consistency"), ("velocity_cosine", "cosine"))
               if table.loc[table.dataset == d, f"{m}_mean"].notna().any()]  # fmt: skip
    header = ["variant"] + [f"{d} {label}" for d, _, label in columns] + [f"fit s ({datasets[0]})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        values = [cell(name, d, m) for d, m, _ in columns]
        lines.append("| " + " | ".join([name, *values, cell(name, datasets[0], "fit_time_s")]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="pancreas_2000,simulation,growth_simulation,scvelo_simulation")
    parser.add_argument("--variant", action="append", default=None, help="run only this variant (repeatable)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from-csv", type=Path, default=None, help="print the table of an earlier run's ablation.csv")
    args = parser.parse_args()
    fv.settings.progress_bar = False
    fv.settings.verbosity = "warning"

    names = list(VARIANTS) if args.variant is None else args.variant
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.from_csv:
        table = pd.read_csv(args.from_csv)
        print(render(table, [n for n in names if n in set(table["variant"])]))
        return
    rows = []
    for name in names:
        method = "fluxvelo_ensemble" if "ensemble" in VARIANTS[name] else "fluxvelo"
        result = fv.benchmark.run(
            args.datasets.split(","),
            methods=[method],
            seeds=args.seeds,
            method_options={method: VARIANTS[name]},
            download=False,
            figure=False,
            keep_adata=False,
        )
        summary = result.summary.assign(variant=name)
        rows.append(summary)
        print(name, "done", flush=True)
    table = pd.concat(rows)
    text = render(table, names)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "ablation.csv", index=False)
        (args.out / "ablation.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
