"""A turnover read from the flow itself: births where a first velocity's Markov chain starts, exits where it ends.

Population balance needs a turnover ``g`` (births minus exits per cell). Where no cell-cycle genes give one, a
first default fit can: its velocity graph's chain has initial and terminal states (scVelo's ``terminal_states``,
``obs['root_cells']`` and ``obs['end_points']``), and ``root - end`` is a turnover that brings cells in where the
flow starts and takes them out where it ends. The default is refitted with it (added to the cell-cycle score where
the default reads one, both standardised) at each ``turnover_rate`` and scored on the three simulators (data
seeds 0-2) against the default; ``--pancreas`` adds pancreas, for information. Never from cluster labels.

Usage::

    python benchmarks/flow_turnover.py [--values 0.005,0.01] [--seeds 0,1,2] [--pancreas]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

import fluxvelo as fv
from fluxvelo.tl._turnover import resolve_source, turnover_rates

sys.path.insert(0, str(Path(__file__).parent))
from levers import SIMULATORS, evaluate, prepare_study, study_args, study_datasets  # noqa: E402


def flow_turnover(adata) -> np.ndarray:
    """``root - end`` of the default velocity's chain, standardised, plus the default's own turnover where it has
    one (also standardised)."""
    import scvelo as scv

    work = adata.copy()
    fv.tl.velocity_graph(work)
    scv.tl.terminal_states(work)
    flow = work.obs["root_cells"].to_numpy(float) - work.obs["end_points"].to_numpy(float)
    flow = turnover_rates(adata, flow, rate=1.0)
    own = turnover_rates(adata, resolve_source(adata, "auto"), rate=1.0)
    return flow if own is None else flow + own


def main() -> None:
    args = study_args(__doc__, "values", "0.005,0.01")
    rows = []
    for name, seed in study_datasets(args.seeds, args.pancreas):
        prep = prepare_study(name, seed)
        fitted = prep.adata.copy()
        fv.tl.velocity(fitted)
        rows.append({"dataset": name, "seed": seed, "variant": "default", **evaluate(fitted, prep)})
        turnover = flow_turnover(fitted)
        for rate in (float(v) for v in args.values.split(",")):
            adata = prep.adata.copy()
            fv.tl.velocity(adata, turnover=turnover, turnover_rate=rate)
            rows.append({"dataset": name, "seed": seed, "variant": f"flow turnover {rate:g}", **evaluate(adata, prep)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    sims = table[table.dataset.isin(SIMULATORS)]
    print("\nmeans over the data seeds")
    print(sims.groupby(["variant", "dataset"], sort=False)[["cosine", "CBC"]].mean().unstack("dataset").round(3).to_string())
    base = sims[sims.variant == "default"].set_index(["dataset", "seed"])
    for variant in dict.fromkeys(sims.variant[sims.variant != "default"]):
        gain = sims[sims.variant == variant].set_index(["dataset", "seed"]).cosine - base.cosine
        print(f"{variant}: cosine above the default's on {(gain > 0).sum()} of {len(gain)} "
              f"({gain.min():+.3f} to {gain.max():+.3f})")  # fmt: skip
    if args.pancreas:
        print("\npancreas (for information)")
        print(table[table.dataset == "pancreas_2000"][["variant", "CBC", "consistency", "edges"]].round(3).to_string())


if __name__ == "__main__":
    main()
