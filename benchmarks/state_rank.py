"""Where to read the fitted field: at the smoothed states as given, or projected onto the leading shared axes.

For each simulator (fluxvelo's own, its growth variant with turnover, scVelo's) and data seeds 0-2, the default
fit is read at the cells' states projected onto ``k`` principal axes of all fitted genes' standardised ``u`` and
``s`` (``fv.tl.velocity(state_rank=k)``), and scored against the true velocity (cosine, over the velocity genes)
and on the true edges (CBC). scVelo's stochastic velocity is read at the same projected states (``u - gamma s``
with its ``gamma``), to show how much of the change is the projection itself rather than the fit. ``--pancreas``
adds the pancreas rows (CBC and consistency), for information: the rank is chosen on the simulators alone.

Usage::

    python benchmarks/state_rank.py [--ranks 10,20,30,50,100] [--seeds 0,1,2] [--pancreas]
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import fluxvelo as fv
from fluxvelo.tl._states import low_rank_states

sys.path.insert(0, str(Path(__file__).parent))
from levers import SIMULATORS, evaluate, prepare_study, study_args, study_datasets  # noqa: E402


def scvelo_at(adata: ad.AnnData, rank: int | None) -> ad.AnnData:
    """scVelo's stochastic velocity ``u - gamma s``, read at the states projected onto ``rank`` axes."""
    work = adata.copy()
    gamma = work.var["velocity_gamma"].to_numpy(float)
    genes = np.flatnonzero(np.isfinite(gamma) & (np.asarray(work.layers["Ms"]).std(0) > 0))
    blocks = np.stack([np.asarray(work.layers["Mu"])[:, genes].T, np.asarray(work.layers["Ms"])[:, genes].T], -1)
    if rank:
        blocks = low_rank_states(torch.from_numpy(blocks.astype(np.float32)), rank, np.random.default_rng(0)).numpy()
    velocity = np.array(work.layers["velocity"], np.float32)
    velocity[:, genes] = (blocks[..., 0] - gamma[genes, None] * blocks[..., 1]).T
    work.layers["velocity"] = velocity
    return work


def main() -> None:
    args = study_args(__doc__, "ranks", "10,20,30,50,100")
    import scvelo as scv

    ranks = [None, *(int(k) for k in args.ranks.split(","))]
    datasets = study_datasets(args.seeds, args.pancreas)
    rows = []
    for name, seed in datasets:
        prep = prepare_study(name, seed)
        stochastic = prep.adata.copy()
        scv.tl.velocity(stochastic, mode="stochastic")
        for rank in ranks:
            fitted = prep.adata.copy()
            fv.tl.velocity(fitted, state_rank=rank or False)
            stochastic_at = scvelo_at(stochastic, rank)
            stochastic_at.var["velocity_genes"] = fitted.var["velocity_genes"]  # the same genes for the graph
            for method, adata in (("fluxvelo", fitted), ("scVelo stochastic", stochastic_at)):
                scores = {k: v for k, v in evaluate(adata, prep).items() if k != "edges"}
                row = {"dataset": name, "seed": seed, "method": method, "rank": rank or "as given", **scores}
                rows.append(row)
                print(row, flush=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    sims = table[table.dataset.isin(SIMULATORS)]
    means = sims.groupby(["method", "rank", "dataset"], sort=False)[["cosine", "CBC"]].mean().unstack("dataset")
    print("\nmeans over the data seeds: cosine to the true velocity, then CBC on the true edges")
    print(means.round(3).to_string())
    if args.pancreas:
        print("\npancreas (for information)")
        print(table[table.dataset == "pancreas_2000"][["method", "rank", "CBC", "consistency"]].round(3).to_string())


if __name__ == "__main__":
    main()
