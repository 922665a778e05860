"""How far to pull each gene's ratio ``gamma / beta`` toward scVelo's steady-state ratio:
``fv.tl.velocity(steady_state_ratio=...)``.

For each simulator (fluxvelo's own, its growth variant with turnover, scVelo's) and data seeds 0-2, the default fit
is read with ``steady_state_ratio`` from 0 (the fitted ratio) to 1 (scVelo's extreme-quantile ratio) and scored
against the true velocity (cosine) and on the true edges (CBC, consistency), beside scVelo stochastic on the same
data. The fit is the same for every value; only the ratio the velocities are read with changes. ``--pancreas``
adds the pancreas rows, for information: the value is chosen on the simulators alone.

``--shared-states`` reads scVelo's extreme-quantile ratio from the states the field is read at (each cell's
smoothed ``(u, s)`` projected onto the 20 shared axes, in the data's units) instead of the smoothed states as
given; a variant that the default does not use (docs/diagnosis.md).

Usage::

    python benchmarks/steady_state_ratio.py [--values 0,0.25,0.5,1] [--seeds 0,1,2] [--pancreas] [--shared-states]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fluxvelo as fv
from fluxvelo.tl import _velocity
from fluxvelo.tl._states import default_rank, low_rank_states
from fluxvelo.tl._steady_state import QuantileFit

sys.path.insert(0, str(Path(__file__).parent))
from levers import SIMULATORS, evaluate, prepare_study, study_args, study_datasets  # noqa: E402


def shared_state_ratios(adata, inp, table, layers) -> np.ndarray:
    """scVelo's extreme-quantile ratio of each fitted gene, read from its states projected onto the shared axes."""
    states = low_rank_states(torch.from_numpy(inp.blocks), default_rank(inp.idx.size), np.random.default_rng(0)).numpy()
    mu, ms = (np.clip(states[..., k].T * scale, 0, None) for k, scale in ((0, inp.scale_u), (1, inp.scale_s)))
    return QuantileFit.over(ms, mu)[0].ratio


def main() -> None:
    args = study_args(__doc__, "values", "0,0.25,0.5,1", flags=("shared-states",))
    import scvelo as scv

    if args.shared_states:
        _velocity.steady_state_ratios = shared_state_ratios

    values = [float(v) for v in args.values.split(",")]
    rows = []
    for name, seed in study_datasets(args.seeds, args.pancreas):
        prep = prepare_study(name, seed)
        stochastic = prep.adata.copy()
        scv.tl.velocity(stochastic, mode="stochastic")
        scores = {k: v for k, v in evaluate(stochastic, prep).items() if k != "edges"}
        rows.append({"dataset": name, "seed": seed, "variant": "scVelo stochastic", **scores})
        for value in values:
            adata = prep.adata.copy()
            fv.tl.velocity(adata, steady_state_ratio=value or False)
            scores = {k: v for k, v in evaluate(adata, prep).items() if k != "edges"}
            rows.append({"dataset": name, "seed": seed, "variant": f"fluxvelo, steady_state_ratio {value:g}", **scores})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    sims = table[table.dataset.isin(SIMULATORS)]
    print("\nmeans over the data seeds")
    means = sims.groupby(["variant", "dataset"], sort=False)[["cosine", "CBC", "consistency"]].mean()
    print(means.unstack("dataset").round(3).to_string())
    baseline = sims[sims.variant == f"fluxvelo, steady_state_ratio {values[0]:g}"].set_index(["dataset", "seed"])
    stochastic = sims[sims.variant == "scVelo stochastic"].set_index(["dataset", "seed"])
    for value in values[1:]:
        rows = sims[sims.variant == f"fluxvelo, steady_state_ratio {value:g}"].set_index(["dataset", "seed"])
        gain = rows[["cosine", "CBC"]] - baseline[["cosine", "CBC"]]
        lead = rows.cosine - stochastic.cosine
        print(f"steady_state_ratio {value:g}: cosine higher than at {values[0]:g} on {(gain.cosine > 0).sum()} of "
              f"{len(gain)} data sets (change {gain.cosine.min():+.3f} to {gain.cosine.max():+.3f}); CBC change "
              f"{gain.CBC.min():+.3f} to {gain.CBC.max():+.3f}; cosine above scVelo stochastic's on "
              f"{(lead > 0).sum()} of {len(lead)} (by {lead.min():+.3f} to {lead.max():+.3f})")  # fmt: skip
    if args.pancreas:
        print("\npancreas (for information)")
        print(table[table.dataset == "pancreas_2000"][["variant", "CBC", "consistency"]].round(3).to_string())


if __name__ == "__main__":
    main()
