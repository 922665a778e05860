"""Does the default fit respond to population-balance turnover? Simulation with known turnover, and pancreas.

    python benchmarks/turnover_response.py                                  # the simulation (growth_rate 0.2)
    FLUXVELO_DATA_DIR=../shared/data python benchmarks/turnover_response.py --pancreas

For each turnover rate (0 = the paper's stationary model) it prints CBC, the cosine to the true velocity (the
simulation), consistency (pancreas) and the median stationarity residual var['fit_stationarity'].
"""

from __future__ import annotations

import argparse

import numpy as np

import fluxvelo as fv
from fluxvelo.benchmark._datasets import prepare
from fluxvelo.benchmark._simulation import ground_truth_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pancreas", action="store_true", help="pancreas_2000 with the cell-cycle score")
    parser.add_argument("--rates", default="0,0.01,0.1,1")
    args = parser.parse_args()
    fv.settings.verbosity, fv.settings.progress_bar = "warning", False
    if args.pancreas:
        prep = prepare("pancreas_2000", download=False)
        adata, edges, source = prep.adata, prep.edges, "cell_cycle"
    else:
        adata = fv.datasets.simulation(n_cells=1500, n_genes=100, growth_rate=0.2, random_state=0)
        fv.pp.recipe_flux(adata, n_top_genes=None, embedding="umap")
        edges, source = [tuple(e) for e in adata.uns["true_edges"]], "true_turnover"
    for rate in (float(r) for r in args.rates.split(",")):
        kw = {} if rate == 0 else dict(turnover=source, turnover_rate=rate)
        fv.tl.velocity(adata, **kw)
        fv.tl.velocity_graph(adata)
        fv.tl.velocity_embedding(adata, basis="umap")
        cbc, per_edge = fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=edges, basis="umap")
        extra = f"consistency {fv.metrics.consistency(adata):.3f}" if args.pancreas else (
            f"cosine {ground_truth_scores(adata)[0]['velocity_cosine']:.3f}")  # fmt: skip
        stat = adata.uns["velocity_params"]["stationarity_median"]
        print(f"rate {rate:<5g} CBC {cbc:.3f} {extra} stationarity {stat:.3f} per edge {np.round(per_edge.cbc.values, 2)}")


if __name__ == "__main__":
    main()
