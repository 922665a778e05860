"""Speed of the velocity fit on pancreas: fluxvelo against scVelo and the literal reference estimator.

Prints, in one run on one machine:
- per-step time of the literal reference estimator and of fluxvelo's estimator on the same batch and draws
  (same loss and gradients; see tests/test_flux.py and tests/test_kernel_cpu.py), at the reference batch of
  256 cells, with the fused CPU kernels and with torch's;
- for pancreas: fit time, peak memory, CBC and consistency of fluxvelo (default preset, and the reference
  settings, preset 'paper') next to scVelo stochastic and dynamical, over several seeds (the benchmark's
  runs), and the ratios the speed targets ask for;
- fit time and memory against the number of cells on simulated data (memory should stay flat).

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/speed.py [--paper-epochs 100] [--scaling 5000,20000,50000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

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


def _median_step(loss_fn, x, repeats: int, *, warm_up: bool) -> float:
    field = KineticField(x.shape[0])
    times = [_step(loss_fn, field, x, i, sigma2=1e-3) for i in range(repeats + warm_up)]
    return float(np.median(times[warm_up:]))


def per_step(adata, n_genes: int, repeats: int) -> dict:
    """Median step time of the estimators on the paper's settings (sigma2 1e-3, unscaled, batch 256)."""
    x, x_all = _batch(adata, n_genes, 256, None), _batch(adata, None, 256, None)
    out = {"genes": x.shape[0], "all_genes": x_all.shape[0]}
    out["reference_s"] = _median_step(reference_loss, x, repeats, warm_up=False)
    for fused in (True, False):
        fv.settings.fused_kernels = fused
        name = "fused" if fused else "torch"
        out[f"{name}_s"] = _median_step(flux_matching_loss, x, repeats, warm_up=True)
        out[f"{name}_all_genes_s"] = _median_step(flux_matching_loss, x_all, repeats, warm_up=True)
    fv.settings.fused_kernels = True
    return out


def pancreas_runs(seeds: int, paper_epochs: int | None) -> "fv.benchmark.BenchmarkResult":
    """The benchmark's four methods on pancreas: fit time, peak memory, CBC and consistency per seed."""
    return fv.benchmark.run(["pancreas_2000"], seeds=seeds, paper_epochs=paper_epochs, figure=False)


def scaling(sizes: list[int], n_genes: int) -> list[dict]:
    rows = []
    for n in sizes:
        a = fv.datasets.simulation(n_cells=n, n_genes=n_genes, random_state=0)
        fv.pp.moments(a, n_neighbors=30, n_pcs=30)
        with Measure() as m:
            fv.tl.velocity(a)
        rows.append({"cells": n, "genes": n_genes, "time_s": m.seconds, "peak_mb": m.delta_mb})
    return rows


def print_steps(step: dict) -> None:
    print(f"\nper step, batch 256, sigma2 1e-3, {step['genes']} genes, same draws:")
    print(f"  literal reference {step['reference_s']:.3f} s")
    for name in ("fused", "torch"):
        ratio = step["reference_s"] / step[f"{name}_s"]
        print(f"  fluxvelo, {name} kernels {step[f'{name}_s']:.4f} s (ratio {ratio:.0f}x); "
              f"all {step['all_genes']} genes {step[f'{name}_all_genes_s']:.3f} s")



def print_pancreas(result, seeds: int) -> None:
    runs = result.runs
    print(f"\npancreas, {seeds} seeds (scVelo is deterministic: one run):")
    print(f"  {'method':<18} {'fit s':>14} {'peak +MiB':>10} {'CBC':>14} {'consistency':>14}")
    for _, r in result.summary.iterrows():
        def cell(metric, digits=3):
            sd = r[f"{metric}_sd"]
            return f"{r[f'{metric}_mean']:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}")
        print(f"  {r['method']:<18} {cell('fit_time_s', 2):>14} {cell('peak_rss_delta_mb', 0):>10} "
              f"{cell('cbc'):>14} {cell('consistency'):>14}")
    fit = runs.groupby("method")["fit_time_s"].mean()
    steps = runs[runs.method == "fluxvelo_paper"]["settings"].map(lambda t: json.loads(t)["steps_taken"]).mean()
    ratio = fit["fluxvelo"] / fit["scvelo_dynamical"]
    print(f"  fluxvelo default / scVelo dynamical fit time = {ratio:.3f} (target <= 0.1)")
    print(f"  reference settings: {steps:.0f} steps, {fit['fluxvelo_paper'] / steps:.3f} s per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-genes", type=int, default=64, help="genes in the per-step comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--paper-epochs", type=int, default=None, help="epochs of the reference settings (default 100)")
    parser.add_argument("--scaling", default="5000,20000,50000", help="cell counts for the memory/time scaling")
    parser.add_argument("--scaling-genes", type=int, default=2000)
    parser.add_argument("--parts", default="steps,pancreas,scaling", help="which parts to run, comma-separated")
    args = parser.parse_args()
    fv.settings.progress_bar = False
    fv.settings.verbosity = "warning"

    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, fluxvelo {fv.__version__}")
    adata = fv.datasets.load("pancreas_2000")
    fv.pp.recipe_flux(adata, embedding=None)
    print(f"pancreas after the paper's preprocessing: {adata.n_obs} cells x {adata.n_vars} genes")

    parts = set(args.parts.split(","))
    if "steps" in parts:
        print_steps(per_step(adata, args.reference_genes, args.repeats))
    if "pancreas" in parts:
        print_pancreas(pancreas_runs(args.seeds, args.paper_epochs), args.seeds)
    if "scaling" in parts and args.scaling:
        print(f"\nscaling with cells (simulation, {args.scaling_genes} genes, default settings):")
        for r in scaling([int(n) for n in args.scaling.split(",")], args.scaling_genes):
            print(f"  {r['cells']:>7} cells  {r['time_s']:8.2f} s  {r['time_s'] / r['cells'] * 1e3:.3f} ms/cell  "
                  f"peak +{r['peak_mb']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
