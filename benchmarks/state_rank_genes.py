"""How many shared axes to read the field at when few genes are fitted.

``state_rank='auto'`` keeps 20 axes (chosen at about 100 genes: ``benchmarks/state_rank.py``). With few genes, 20
axes of ``2 x genes`` columns keep most of each gene's own noise. For each simulator (fluxvelo's own, its growth
variant with turnover, scVelo's) at 15, 25, 50 and 100 genes and data seeds 0-2, the default fit is read at each
rank in ``--ranks`` and at ``rank = min(20, ceil(f x fitted genes))`` for each ``f`` in ``--fractions``, and scored
against the true velocity (cosine), on the true edges (CBC) and for consistency. The true velocity's own CBC is
printed beside them: with few genes CBC is no longer at its ceiling.

Usage::

    python benchmarks/state_rank_genes.py [--ranks 4,8,12,20] [--fractions 0.3,0.5,0.8] [--genes 15,25,50,100]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import fluxvelo as fv
from fluxvelo.benchmark._datasets import prepare
from fluxvelo.tl._states import STATE_RANK

sys.path.insert(0, str(Path(__file__).parent))
from levers import SIMULATORS, evaluate, quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="4,8,12,20")
    parser.add_argument("--fractions", default="0.3,0.5,0.8")
    parser.add_argument("--genes", default="15,25,50,100")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    quiet()
    rows = []
    for name in SIMULATORS:
        for n_genes in (int(g) for g in args.genes.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                prep = prepare(name, download=False, simulation_options={"random_state": seed, "n_genes": n_genes})
                data = f"{name}, {n_genes} genes"
                base = prep.adata.copy()
                fv.tl.velocity(base, random_state=seed, state_rank=False)
                fitted = int(np.isfinite(base.var["fit_beta"]).sum())
                truth = base.copy()
                truth.layers["velocity"] = np.asarray(truth.layers["true_velocity"], np.float32)
                truth.var["velocity_genes"] = True
                rows.append({"data": data, "seed": seed, "read at": "true velocity", **evaluate(truth, prep)})
                readings = {f"{k} axes": k for k in (int(k) for k in args.ranks.split(","))}
                for f in (float(f) for f in args.fractions.split(",")):
                    readings[f"min(20, {f} x genes)"] = min(STATE_RANK, math.ceil(f * fitted))
                for label, rank in readings.items():
                    adata = prep.adata.copy()
                    fv.tl.velocity(adata, random_state=seed, state_rank=rank)
                    rows.append({"data": data, "seed": seed, "read at": label, "rank": rank, **evaluate(adata, prep)})
                print(f"{data}, data seed {seed}: {fitted} genes fitted", flush=True)
    table = pd.DataFrame(rows)
    for metric in ("cosine", "CBC", "consistency"):
        print(f"\n{metric}, means over the data seeds")
        print(table.groupby(["read at", "data"], sort=False)[metric].mean().unstack("data").round(3).T.to_string())
    at_20 = table[table["read at"] == f"{STATE_RANK} axes"].set_index(["data", "seed"])
    print(f"\nagainst {STATE_RANK} axes, over the {len(at_20)} data sets")
    for label in dict.fromkeys(table["read at"]):
        if label.startswith("min("):
            gap = table[table["read at"] == label].set_index(["data", "seed"])[["cosine", "CBC"]] - at_20[["cosine", "CBC"]]
            print(f"{label}: cosine up on {(gap.cosine > 0).sum()}, down on {(gap.cosine < 0).sum()} (worst "
                  f"{gap.cosine.min():+.3f}, mean {gap.cosine.mean():+.4f}); CBC up on {(gap.CBC > 0).sum()}, down on "
                  f"{(gap.CBC < 0).sum()} (worst {gap.CBC.min():+.3f}, mean {gap.CBC.mean():+.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
