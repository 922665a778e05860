"""The default turnover source on simulations: a few noisy marker genes instead of the true turnover.

``turnover_rate.py`` chose the rate with the true turnover in hand. On real data ``turnover='auto'`` reads a
proliferation score from cell-cycle marker genes, often only a handful among the highly variable genes (5 on the
benchmark's pancreas). This script asks how much that costs, and whether averaging the score over each cell's
kNN neighbours (as the moments ``Ms``/``Mu`` average the expression the fit sees) wins it back, and at which
rate. ``--scvelo`` runs scVelo's simulator instead, with births and exits at the ends of its time span as in
``turnover_rate.py --scvelo``; its markers are scored beside the data, on the same cells.

Each growth simulation (``fv.datasets.simulation(growth_rate=..., cell_cycle_genes=5)``: cells divide on the
trunk and leave along the branches) carries ``--markers`` proliferation marker genes: a cell on the trunk is in S
or G2/M with probability 1/2, where each marker's expected count is 4 times its baseline of 2. The markers have no
true velocity, so they are left out of the score. Then, on the same preprocessed data (``recipe_flux``), it fits:

- scVelo's stochastic model (its gamma, computed in fluxvelo and tested against scVelo);
- the balanced default with the true turnover (``turnover='true_turnover'``), as in ``turnover_rate.py``;
- the marker score as ``turnover='auto'`` computes it from those genes (``cell_cycle_score``);
- the marker score averaged over each cell and its kNN neighbours (the operator of the moments).

and prints the cosine to the true velocity over scVelo's velocity genes, and its means over seeds.

    python benchmarks/turnover_proxy.py [--growth 0.1,0.3,1] [--seeds 3] [--rates 0.005] [--markers 5]
    python benchmarks/turnover_proxy.py --scvelo [--rates 0.005]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from anndata import AnnData

import fluxvelo as fv
from fluxvelo.datasets._simulation import CELL_CYCLE_MARKERS, _markers
from fluxvelo.pp._moments import smoothing_matrix
from fluxvelo.tl._steady_state import stochastic_velocity_genes
from fluxvelo.tl._turnover import cell_cycle_score

sys.path.insert(0, str(Path(__file__).parent))
from turnover_rate import _cosine, _scvelo_simulation, print_means, record  # noqa: E402


def proxies(score: np.ndarray, adata: AnnData) -> dict[str, np.ndarray]:
    """The marker score as ``turnover='cell_cycle'`` computes it, and averaged over each cell and its neighbours."""
    return {"markers": score, "markers, kNN": smoothing_matrix(adata.obsp["connectivities"]) @ score}


def scvelo_design(seed: int, n_markers: int) -> tuple[AnnData, dict[str, np.ndarray]]:
    """scVelo's simulator, preprocessed, with births in the first and exits in the last tenth of its time span
    (``turnover_rate.py --scvelo``), and the marker scores of cycling cells in that first tenth; the markers are
    scored on their own (through :func:`cell_cycle_score`), not added to the fitted genes."""
    adata = _scvelo_simulation(seed)
    rng = np.random.default_rng(1000 + seed)
    cycling = (adata.obs["true_turnover"].to_numpy() > 0) & (rng.random(adata.n_obs) < 0.5)
    counts = _markers(rng, cycling, np.ones(adata.n_obs), n_markers, "poisson", None)["spliced"]
    markers = AnnData(np.log1p(counts).astype(np.float32), obs=adata.obs[[]])
    markers.var_names = list(CELL_CYCLE_MARKERS[:n_markers])
    return adata, proxies(cell_cycle_score(markers), adata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--growth", default="0.1,0.3,1")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rates", default="0.005")
    parser.add_argument("--markers", type=int, default=5)
    parser.add_argument("--scvelo", action="store_true", help="scVelo's simulator with end-point turnover")
    args = parser.parse_args()
    fv.settings.verbosity, fv.settings.progress_bar = "warning", False
    means = defaultdict(list)
    for growth in [None] if args.scvelo else (float(g) for g in args.growth.split(",")):
        for seed in range(args.seeds):
            if growth is None:
                adata, sources = scvelo_design(seed, args.markers)
            else:
                adata = fv.datasets.simulation(n_cells=1500, n_genes=100, growth_rate=growth,
                                               cell_cycle_genes=args.markers, random_state=seed)  # fmt: skip
                fv.pp.recipe_flux(adata, n_top_genes=None, embedding="umap")
                sources = proxies(cell_cycle_score(adata), adata)
            table = stochastic_velocity_genes(adata)
            genes = table["velocity_genes"].to_numpy(bool) & np.isfinite(adata.layers["true_velocity"]).all(0)
            u, s = adata.layers["Mu"], adata.layers["Ms"]
            scores = {"scvelo_stochastic": _cosine(adata, u - table["gamma"].to_numpy() * s, genes)}
            for rate in (float(r) for r in args.rates.split(",")):
                for name, source in {"true": "true_turnover", **sources}.items():
                    fit = fv.tl.velocity(adata, turnover=source, turnover_rate=rate, random_state=seed, copy=True)
                    scores[f"{name} {rate:g}"] = _cosine(adata, fit.layers["velocity"], genes)
            record(means, growth, seed, scores)
    print_means(means)


if __name__ == "__main__":
    main()
