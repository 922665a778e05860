"""How far to pull each gene's clock toward one shared by all genes: ``fv.tl.velocity(shared_clock=...)``.

For each simulator (fluxvelo's own, its growth variant with turnover, scVelo's) and data seeds 0-2, the default fit
is run with ``shared_clock`` from 0 (each gene's splicing clock) to 1 (every gene's spliced velocity spreads over
the cells as much as its spliced abundance) and scored against the true velocity (cosine) and on the true edges
(CBC, consistency). The fit is the same for every value; only the per-gene time unit changes. scVelo stochastic's
velocity is rescaled the same way, per gene by ``(std(Ms) / std(velocity))^value``, to show how much of the change
is the re-weighting of the genes rather than the fit. ``--pancreas`` adds the pancreas rows, for information: the
value is chosen on the simulators alone.

Usage::

    python benchmarks/shared_clock.py [--values 0,0.25,0.5,0.75,1] [--seeds 0,1,2] [--pancreas]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

import fluxvelo as fv

sys.path.insert(0, str(Path(__file__).parent))
from levers import SIMULATORS, evaluate, prepare_study, study_args, study_datasets  # noqa: E402


def pooled(adata, value: float):
    """A copy of ``adata`` whose velocity is rescaled per gene by ``(std(Ms) / std(velocity))^value``."""
    work = adata.copy()
    velocity = np.asarray(work.layers["velocity"], np.float64)
    spread = np.asarray(work.layers["Ms"], np.float64).std(0) / np.nanstd(velocity, 0)
    work.layers["velocity"] = (velocity * np.nan_to_num(spread**value, nan=1.0, posinf=1.0)).astype(np.float32)
    return work


def main() -> None:
    args = study_args(__doc__, "values", "0,0.25,0.5,0.75,1")
    values = [float(v) for v in args.values.split(",")]
    datasets = study_datasets(args.seeds, args.pancreas)
    import scvelo as scv

    rows = []
    for name, seed in datasets:
        prep = prepare_study(name, seed)
        stochastic = prep.adata.copy()
        scv.tl.velocity(stochastic, mode="stochastic")
        for value in values:
            adata = prep.adata.copy()
            fv.tl.velocity(adata, shared_clock=value or False)
            scores = {k: v for k, v in evaluate(adata, prep).items() if k != "edges"}
            rows.append({"dataset": name, "seed": seed, "shared_clock": value, "method": "fluxvelo", **scores})
            print(rows[-1], flush=True)
            rescaled = pooled(stochastic, value)
            rescaled.var["velocity_genes"] = adata.var["velocity_genes"]  # the same genes for the graph
            scores = {k: v for k, v in evaluate(rescaled, prep).items() if k != "edges"}
            rows.append({"dataset": name, "seed": seed, "shared_clock": value, "method": "scVelo stochastic", **scores})
    table = pd.DataFrame(rows)
    scvelo_rows = table[(table.method == "scVelo stochastic") & table.dataset.isin(SIMULATORS)]
    print("\nscVelo stochastic rescaled the same way: mean cosine over the data seeds")
    print(scvelo_rows.groupby(["shared_clock", "dataset"], sort=False)["cosine"].mean().unstack("dataset").round(3))
    table = table[table.method == "fluxvelo"]
    sims = table[table.dataset.isin(SIMULATORS)]
    means = sims.groupby(["shared_clock", "dataset"], sort=False)[["cosine", "CBC", "consistency"]].mean()
    print("\nmeans over the data seeds")
    print(means.unstack("dataset").round(3).to_string())
    baseline = sims[sims.shared_clock == values[0]].set_index(["dataset", "seed"])
    for value in values[1:]:
        gain = sims[sims.shared_clock == value].set_index(["dataset", "seed"])[["cosine", "CBC"]] - baseline[["cosine", "CBC"]]
        print(f"shared_clock {value}: cosine higher than at {values[0]} on {(gain.cosine > 0).sum()} of {len(gain)} "
              f"data sets (change {gain.cosine.min():+.3f} to {gain.cosine.max():+.3f}); CBC change "
              f"{gain.CBC.min():+.3f} to {gain.CBC.max():+.3f}")  # fmt: skip
    if args.pancreas:
        print("\npancreas (for information)")
        print(table[table.dataset == "pancreas_2000"][["shared_clock", "CBC", "consistency"]].round(3).to_string())


if __name__ == "__main__":
    main()
