"""Why a turnover helps on one simulator and hurts on another: the balance shifts each gene's line by a constant.

Under the population balance, each gene's ``gamma'`` moves by ``E[g s] / (beta E[s])``, with the sign of the
covariance between the (centred) turnover ``g`` and the gene's spliced level: the gene's net change from where
cells are born to where they leave. For scVelo's simulator (births in the first and exits in the last tenth of the
time span, as in ``turnover_rate.py --scvelo``) and the growth simulation (growth rate 0.3), seed 0, over scVelo's
velocity genes, this prints how many genes have ``E[g s] > 0`` (lower where cells leave), the share of rising
cell-gene pairs at births, between and at exits, and the wrong signs of the balanced fit without turnover and
with the true turnover at the default rate, split by the true sign.

    python benchmarks/turnover_shift.py [--rate 0.01] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import fluxvelo as fv
from fluxvelo.tl._steady_state import stochastic_velocity_genes

sys.path.insert(0, str(Path(__file__).parent))
from turnover_rate import _growth_simulation, _scvelo_simulation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fv.settings.verbosity, fv.settings.progress_bar = "warning", False
    designs = {"scVelo's simulator": _scvelo_simulation(args.seed),
               "growth simulation 0.3": _growth_simulation(0.3, args.seed)}  # fmt: skip
    for name, adata in designs.items():
        genes = stochastic_velocity_genes(adata)["velocity_genes"].to_numpy(bool)
        truth, s = adata.layers["true_velocity"][:, genes], adata.layers["Ms"][:, genes]
        g = adata.obs["true_turnover"].to_numpy()
        shift_sign = ((g - g.mean())[:, None] * s).mean(0)
        rising = [np.mean(truth[part] > 0) for part in (g > 0, g == 0, g < 0)]
        print(f"{name}: {genes.sum()} genes, {np.sum(shift_sign > 0)} lower where cells leave (E[g s] > 0); "
              "rising pairs at births / between / at exits " + " / ".join(f"{r:.2f}" for r in rising))
        for rate in (0.0, args.rate):
            source = dict(turnover="true_turnover", turnover_rate=rate) if rate else dict(turnover=False)
            v = fv.tl.velocity(adata, balance=True, random_state=args.seed, copy=True, **source).layers["velocity"]
            v = v[:, genes]
            print(f"  rate {rate:g}: true > 0 estimated < 0 {np.mean(v[truth > 0] < 0):.3f}, "
                  f"true < 0 estimated > 0 {np.mean(v[truth < 0] > 0):.3f}", flush=True)


if __name__ == "__main__":
    main()
