"""Choose the default turnover rate on simulations with known turnover, never on real data.

    python benchmarks/turnover_rate.py                       # growth rates 0.1, 0.3, 1; seeds 0-2
    python benchmarks/turnover_rate.py --growth 0.3 --seeds 1
    python benchmarks/turnover_rate.py --scvelo             # scVelo's simulator, a second design

For each simulated lineage (``fv.datasets.simulation(growth_rate=...)``: cells divide on the trunk and leave along
the branches, so the density is stationary only with turnover), it fits the balanced default with the true
turnover ``obs['true_turnover']`` at each candidate rate and prints the cosine to the true velocity over scVelo's
velocity genes, next to scVelo's stochastic model (its gamma, computed in fluxvelo and tested against scVelo) and
to the strictly stationary balanced fit (rate 0). The last lines are the means over seeds.

``--scvelo`` uses scVelo's simulator instead (one induction and repression per gene, uniform in time): its cells
are stationary with births at the start and exits at the end, so the turnover given is +1 for the first and -1 for
the last 10% of the true time span, 0 between.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

import fluxvelo as fv
from fluxvelo.benchmark._simulation import ground_truth_scores
from fluxvelo.tl._steady_state import stochastic_velocity_genes


def _cosine(adata, velocity: np.ndarray, genes: np.ndarray) -> float:
    adata.layers["estimate"] = np.where(genes, velocity, np.nan).astype(np.float32)
    return ground_truth_scores(adata, vkey="estimate")[0]["velocity_cosine"]


def _growth_simulation(growth: float, seed: int):
    adata = fv.datasets.simulation(n_cells=1500, n_genes=100, growth_rate=growth, random_state=seed)
    fv.pp.recipe_flux(adata, n_top_genes=None, embedding="umap")
    return adata


def _scvelo_simulation(seed: int):
    from fluxvelo.benchmark._datasets import prepare

    adata = prepare("scvelo_simulation", download=False, simulation_options={"random_state": seed}).adata
    t = adata.obs["true_t"].to_numpy()
    position = (t - t.min()) / (t.max() - t.min())
    adata.obs["true_turnover"] = np.where(position < 0.1, 1.0, np.where(position > 0.9, -1.0, 0.0))
    return adata


def record(means: dict, growth: float | None, seed: int, scores: dict[str, float]) -> None:
    """Add one simulation's scores to ``means`` (growth None: scVelo's simulator) and print them."""
    for name, value in scores.items():
        means[(growth, name)].append(value)
    label = "scVelo" if growth is None else growth
    print(f"growth {label} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)


def print_means(means: dict) -> None:
    print("\nmean cosine to the true velocity over seeds")
    for (growth, name), values in means.items():
        print(f"growth {'scVelo' if growth is None else f'{growth:g}':<6} {name:<22} {np.mean(values):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--growth", default="0.1,0.3,1")
    parser.add_argument("--rates", default="0,0.001,0.002,0.003,0.005,0.007,0.01")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scvelo", action="store_true", help="scVelo's simulator with end-point turnover")
    args = parser.parse_args()
    fv.settings.verbosity, fv.settings.progress_bar = "warning", False
    means = defaultdict(list)
    for growth in [None] if args.scvelo else (float(g) for g in args.growth.split(",")):
        for seed in range(args.seeds):
            adata = _scvelo_simulation(seed) if args.scvelo else _growth_simulation(growth, seed)
            table = stochastic_velocity_genes(adata)
            genes = table["velocity_genes"].to_numpy(bool)
            u, s = adata.layers["Mu"], adata.layers["Ms"]
            scores = {"scvelo_stochastic": _cosine(adata, u - table["gamma"].to_numpy() * s, genes)}
            for rate in (float(r) for r in args.rates.split(",")):
                source = dict(turnover="true_turnover", turnover_rate=rate) if rate > 0 else dict(turnover=False)
                fit = fv.tl.velocity(adata, balance=True, random_state=seed, copy=True, **source)
                scores[f"rate {rate:g}"] = _cosine(adata, fit.layers["velocity"], genes)
            record(means, growth, seed, scores)
    print_means(means)


if __name__ == "__main__":
    main()
