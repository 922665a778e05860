"""Time fv.tl.velocity_graph + velocity_embedding against scVelo's on full pancreas, in one run.

    python benchmarks/graph_speed.py [--data PATH] [--repeats 3] [--scvelo-n-jobs N]

Prepares pancreas_3696x2000.h5ad with scVelo's pipeline (filter_and_normalize(min_shared_counts=20),
log1p and 2,000 highly variable genes, moments(n_pcs=30, n_neighbors=30), velocity(mode='stochastic'),
scanpy umap(random_state=0)), then times both implementations on the same AnnData. Each is run once
untimed first (numba JIT / cache load, imports), then ``--repeats`` times; the median is reported.
Also prints the largest differences between the two results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(os.environ.get("FLUXVELO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def prepare(path: Path):
    import anndata as ad
    import scanpy as sc
    import scvelo as scv

    adata = ad.read_h5ad(path)
    warnings.simplefilter("ignore")
    try:  # classic scvelo selects genes and logs here; scvelo-modern does not take n_top_genes
        scv.pp.filter_and_normalize(adata, min_shared_counts=20, n_top_genes=2000)
    except TypeError:
        scv.pp.filter_and_normalize(adata, min_shared_counts=20)
        sc.pp.log1p(adata)
        if adata.n_vars > 2000:
            sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat", subset=True)
    scv.pp.moments(adata, n_pcs=30, n_neighbors=30)
    scv.tl.velocity(adata, mode="stochastic")
    sc.tl.umap(adata, random_state=0)
    return adata


def timed(fn, adata, repeats):
    first = time.perf_counter()
    fn(adata)
    first = time.perf_counter() - first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(adata)
        times.append(time.perf_counter() - t0)
    return first, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "pancreas_3696x2000.h5ad")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scvelo-n-jobs", type=int, default=None, help="n_jobs for scVelo's velocity_graph")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found; pass --data or set FLUXVELO_DATA_DIR.")

    warnings.filterwarnings("ignore")
    import scvelo as scv

    import fluxvelo as fv

    scv.settings.verbosity = 0
    fv.settings.verbosity = "warning"

    t0 = time.perf_counter()
    adata = prepare(args.data)
    print(f"prepared {adata.n_obs} cells x {adata.n_vars} genes "
          f"({int(adata.var['velocity_genes'].sum())} velocity genes) in {time.perf_counter() - t0:.1f} s")

    ours, theirs = adata.copy(), adata.copy()
    steps = {
        "fluxvelo velocity_graph": (lambda a: fv.tl.velocity_graph(a), ours),
        "fluxvelo velocity_embedding": (lambda a: fv.tl.velocity_embedding(a, basis="umap"), ours),
        "scvelo velocity_graph": (
            lambda a: scv.tl.velocity_graph(a, n_jobs=args.scvelo_n_jobs, show_progress_bar=False),
            theirs,
        ),
        "scvelo velocity_embedding": (lambda a: scv.tl.velocity_embedding(a, basis="umap"), theirs),
    }
    med = {}
    for name, (fn, data) in steps.items():
        first, times = timed(fn, data, args.repeats)
        med[name] = statistics.median(times)
        print(f"{name:30s} first {first:7.3f} s   median {med[name]:7.3f} s   "
              f"runs {', '.join(f'{t:.3f}' for t in times)}")

    ours_total = med["fluxvelo velocity_graph"] + med["fluxvelo velocity_embedding"]
    theirs_total = med["scvelo velocity_graph"] + med["scvelo velocity_embedding"]
    print(f"graph speed-up      {med['scvelo velocity_graph'] / med['fluxvelo velocity_graph']:6.1f}x")
    print(f"embedding speed-up  {med['scvelo velocity_embedding'] / med['fluxvelo velocity_embedding']:6.1f}x")
    print(f"total: fluxvelo {ours_total:.3f} s, scvelo {theirs_total:.3f} s, ratio {theirs_total / ours_total:.1f}x")

    diff_g = np.abs((ours.uns["velocity_graph"] - theirs.uns["velocity_graph"]).toarray()).max()
    diff_n = np.abs((ours.uns["velocity_graph_neg"] - theirs.uns["velocity_graph_neg"]).toarray()).max()
    diff_e = np.abs(ours.obsm["velocity_umap"] - theirs.obsm["velocity_umap"]).max()
    print(f"max |difference|: graph {diff_g:.2e}, graph_neg {diff_n:.2e}, velocity_umap {diff_e:.2e}")


if __name__ == "__main__":
    main()
