"""Speed of the velocity fit on pancreas: fluxvelo against scVelo and the literal reference estimator.

Prints, in one run on one machine:
- per-step time of the literal reference estimator and of fluxvelo's estimator on the same batch and draws
  (same loss and gradients; see tests/test_flux.py), at the reference batch of 256 cells;
- whole-fit time and peak memory of fluxvelo (default preset) next to scVelo stochastic and dynamical;
- fit time and memory against the number of cells on simulated data (memory should stay flat).

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/speed.py [--reference-genes 64] [--scaling 5000,20000,50000]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch

import fluxvelo as fv
from fluxvelo.benchmark._memory import Measure
from fluxvelo.fields import KineticField
from fluxvelo.flux import flux_matching_loss, reference_loss


def _batch(adata, genes: int | None, cells: int, gene_scale: float | None) -> torch.Tensor:
    u, s = adata.layers["Mu"][:cells], adata.layers["Ms"][:cells]
    keep = (u.std(0) > 0) & (s.std(0) > 0)
    u, s = u[:, keep][:, :genes], s[:, keep][:, :genes]
    if gene_scale:
        u, s = gene_scale * u / u.std(0), gene_scale * s / s.std(0)
    return torch.from_numpy(np.stack([u, s], -1).transpose(1, 0, 2).astype(np.float32).copy())


def _step(loss_fn, field, x, seed, **kw) -> float:
    start = time.perf_counter()
    loss = loss_fn(field, x, generator=torch.Generator().manual_seed(seed), **kw)
    loss = loss.loss if hasattr(loss, "loss") else loss
    loss.backward()
    return time.perf_counter() - start


def per_step(adata, n_genes: int, repeats: int) -> dict:
    """Median step time of both estimators on the paper's settings (sigma2 1e-3, unscaled, batch 256)."""
    x = _batch(adata, n_genes, 256, None)
    field = KineticField(x.shape[0])
    fast = [_step(flux_matching_loss, field, x, i, sigma2=1e-3) for i in range(repeats + 1)][1:]
    slow = [_step(reference_loss, field, x, i, sigma2=1e-3) for i in range(repeats)]
    x_all = _batch(adata, None, 256, None)
    fast_all = [_step(flux_matching_loss, KineticField(x_all.shape[0]), x_all, i, sigma2=1e-3) for i in range(repeats + 1)][1:]
    return {
        "genes": x.shape[0],
        "reference_s": float(np.median(slow)),
        "fluxvelo_s": float(np.median(fast)),
        "all_genes": x_all.shape[0],
        "fluxvelo_all_genes_s": float(np.median(fast_all)),
    }


def whole_fits(adata, seeds: list[int]) -> list[dict]:
    import scvelo as scv

    rows = []
    for seed in seeds:
        a = adata.copy()
        with Measure() as m:
            fv.tl.velocity(a, random_state=seed)
        rows.append({"method": "fluxvelo default", "seed": seed, "time_s": m.seconds, "peak_mb": m.delta_mb})
    a = adata.copy()
    with Measure() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity(a, mode="stochastic")
    rows.append({"method": "scVelo stochastic", "seed": 0, "time_s": m.seconds, "peak_mb": m.delta_mb})
    a = adata.copy()
    with Measure() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.recover_dynamics(a, n_jobs=2)
        scv.tl.velocity(a, mode="dynamical")
    rows.append({"method": "scVelo dynamical (n_jobs=2)", "seed": 0, "time_s": m.seconds, "peak_mb": m.delta_mb})
    return rows


def scaling(sizes: list[int], n_genes: int) -> list[dict]:
    rows = []
    for n in sizes:
        a = fv.datasets.simulation(n_cells=n, n_genes=n_genes, random_state=0)
        fv.pp.moments(a, n_neighbors=30, n_pcs=30)
        with Measure() as m:
            fv.tl.velocity(a)
        rows.append({"cells": n, "genes": n_genes, "time_s": m.seconds, "peak_mb": m.delta_mb})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-genes", type=int, default=64, help="genes in the per-step comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scaling", default="5000,20000,50000", help="cell counts for the memory/time scaling")
    parser.add_argument("--scaling-genes", type=int, default=2000)
    args = parser.parse_args()
    fv.settings.progress_bar = False
    fv.settings.verbosity = "warning"

    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, fluxvelo {fv.__version__}")
    adata = fv.datasets.load("pancreas_2000")
    fv.pp.recipe_flux(adata, embedding=None)
    print(f"pancreas after the paper's preprocessing: {adata.n_obs} cells x {adata.n_vars} genes")

    step = per_step(adata, args.reference_genes, args.repeats)
    ratio = step["reference_s"] / step["fluxvelo_s"]
    print(f"\nper step, batch 256, sigma2 1e-3, {step['genes']} genes, same draws:")
    print(f"  literal reference {step['reference_s']:.3f} s   fluxvelo {step['fluxvelo_s']:.4f} s   ratio {ratio:.0f}x")
    print(f"  fluxvelo on all {step['all_genes']} genes: {step['fluxvelo_all_genes_s']:.3f} s per step")

    rows = whole_fits(adata, [int(s) for s in args.seeds.split(",")])
    print("\nwhole fit (default settings), pancreas:")
    for r in rows:
        print(f"  {r['method']:<30} seed {r['seed']}  {r['time_s']:8.2f} s  peak +{r['peak_mb']:.0f} MiB")
    dyn = next(r["time_s"] for r in rows if r["method"].startswith("scVelo dynamical"))
    ours = float(np.mean([r["time_s"] for r in rows if r["method"] == "fluxvelo default"]))
    print(f"  fluxvelo default / scVelo dynamical = {ours / dyn:.3f}")

    if args.scaling:
        print(f"\nscaling with cells (simulation, {args.scaling_genes} genes, default settings):")
        for r in scaling([int(n) for n in args.scaling.split(",")], args.scaling_genes):
            print(f"  {r['cells']:>7} cells  {r['time_s']:8.2f} s  {r['time_s'] / r['cells'] * 1e3:.3f} ms/cell  "
                  f"peak +{r['peak_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
