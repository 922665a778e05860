"""What CBC on the simulators' true edges can tell apart: the true velocity's own CBC beside the methods'.

On each simulator (fluxvelo's own, its growth variant with turnover, scVelo's) and data seeds 0-2, the benchmark's
graph, embedding and metrics score fluxvelo's default, scVelo's stochastic and dynamical modes and the simulator's
true velocity (on every gene, and on the genes the default uses). CBC scores the velocity after the cosine graph
and the projection into the embedding; where the true velocity scores no higher than the methods, CBC on that
simulator is at its ceiling and differences between methods below the truth's own margin say nothing about
direction. The cosine to the true velocity is printed beside it.

Usage::

    python benchmarks/cbc_ceiling.py [--seeds 0,1,2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fluxvelo.benchmark._methods import METHODS

sys.path.insert(0, str(Path(__file__).parent))
from levers import SIMULATORS, evaluate, prepare_study, study_args  # noqa: E402


def main() -> None:
    args = study_args(__doc__, "methods", "fluxvelo,scvelo_stochastic,scvelo_dynamical")
    rows = []
    for name in SIMULATORS:
        for seed in (int(s) for s in args.seeds.split(",")):
            prep = prepare_study(name, seed)
            fitted = {}
            for method in args.methods.split(","):
                adata = prep.adata.copy()
                METHODS[method].fit(adata, seed, {})
                fitted[method] = adata
            truth = fitted["fluxvelo"].copy()
            truth.layers["velocity"] = np.asarray(truth.layers["true_velocity"], np.float32)
            fitted["true velocity, the default's genes"] = truth
            every = truth.copy()
            every.var["velocity_genes"] = True
            fitted["true velocity, every gene"] = every
            for label, adata in fitted.items():
                scores = evaluate(adata, prep)
                rows.append({"dataset": name, "seed": seed, "velocity": label, **scores})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print("\nmeans over the data seeds")
    means = table.groupby(["velocity", "dataset"], sort=False)[["CBC", "cosine"]].mean()
    print(means.unstack("dataset").round(4).to_string())
    truth = table[table.velocity == "true velocity, every gene"].set_index(["dataset", "seed"]).CBC
    print("\nCBC above the true velocity's (every gene), per data set")
    for label in dict.fromkeys(table.velocity):
        gap = table[table.velocity == label].set_index(["dataset", "seed"]).CBC - truth
        print(f"{label}: {gap.min():+.4f} to {gap.max():+.4f}, above it on {(gap > 0).sum()} of {len(gap)}")


if __name__ == "__main__":
    main()
