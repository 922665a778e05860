"""Each gene's clock: how the balanced fit's spliced velocity depends on the rate ``beta`` that the data cannot fix.

With the population balance, ``gamma`` is held to the spliced balance, so the spliced velocity in scVelo's units is

    u - gamma' s,   gamma' = E[u] / E[s] + E[g s] / (beta E[s])     (the fit's coordinates)

and the fit enters it only through ``beta``, each gene's clock against the turnover's. A snapshot with unit
diffusion fixes ``beta`` only through a model of the drive. This script measures three ways to set it:

- **moment start** (``steps 0``): ``beta`` of the constant-drive balance (test functions ``u``, ``u^2``), where
  the default fit starts; one step at a learning rate of 1e-12 leaves it there;
- **Flux Matching** (``steps 40``, ``120``): the default fit, which moves ``beta`` with the drive;
- **spliced clock**: ``beta`` from the spliced test functions ``s`` and ``s^2`` alone, which involve no drive
  (``beta = (E[s^2] E[g s] / E[s] - 1 - E[g s^2] / 2) / (E[u s] - E[u] E[s^2] / E[s])``); the moment start's
  ``beta`` where that is not positive.

each at several turnover rates, on simulations with known turnover (the designs of ``turnover_rate.py``: the growth
simulation at growth rates 0.1, 0.3 and 1, and scVelo's simulator with births at the start and exits at the end),
scored by the cosine to the true velocity over scVelo's velocity genes. ``--pancreas`` adds pancreas with the
cell-cycle score (CBC, consistency, the Ductal edge), for information only: settings are chosen on simulations.

    python benchmarks/time_scale.py [--seeds 3] [--rates 0.005,0.0075,0.01] [--steps 0,40,120] [--pancreas]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

import fluxvelo as fv
from fluxvelo.tl._steady_state import stochastic_velocity_genes
from fluxvelo.tl._turnover import turnover_rates

sys.path.insert(0, str(Path(__file__).parent))
from turnover_rate import _cosine, _growth_simulation, _scvelo_simulation  # noqa: E402


def fit(adata, source: str, rate: float, steps: int, seed: int):
    """The balanced default at ``steps`` Flux Matching steps (0: left at the moment start)."""
    opts = {"n_steps": 1, "lr": 1e-12} if steps == 0 else {"n_steps": steps}
    return fv.tl.velocity(adata, balance=True, turnover=source, turnover_rate=rate, random_state=seed, copy=True, **opts)


def spliced_clock_velocity(adata, start, source: str, rate: float) -> np.ndarray:
    """``u - gamma' s`` with ``beta`` from the spliced balance (``s``, ``s^2``), in the layers' units."""
    scale_u, scale_s = start.var["fit_scaling_u"].to_numpy(), start.var["fit_scaling_s"].to_numpy()
    u, s = adata.layers["Mu"] / scale_u, adata.layers["Ms"] / scale_s
    g = turnover_rates(adata, source, rate=rate).astype(np.float64)[:, None]
    eu, es, eus, ess = u.mean(0), s.mean(0), (u * s).mean(0), (s * s).mean(0)
    gu, gs, guu, gss = (g * u).mean(0), (g * s).mean(0), (g * u * u).mean(0), (g * s * s).mean(0)
    beta_moment = (1 + guu / 2 - eu * gu) / u.var(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta_spliced = (ess * gs / es - 1 - gss / 2) / (eus - eu * ess / es)
    beta = np.where(beta_spliced > 0, beta_spliced, beta_moment)
    gamma_prime = (beta * eu + gs) / (es * beta) * scale_u / scale_s
    velocity = adata.layers["Mu"] - gamma_prime * adata.layers["Ms"]
    return np.where(np.isfinite(start.var["fit_beta"].to_numpy()), velocity, np.nan).astype(np.float32)


def pancreas_scores(work, prep) -> str:
    fv.tl.velocity_graph(work)
    fv.tl.velocity_embedding(work, basis=prep.basis)
    cbc, edges = fv.metrics.cross_boundary_correctness(work, cluster_key=prep.cluster_key, edges=prep.edges, basis=prep.basis)
    return f"CBC {cbc:.3f}  consistency {fv.metrics.consistency(work):.3f}  Ductal edge {edges.iloc[0, 2]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rates", default="0.005,0.0075,0.01")
    parser.add_argument("--steps", default="0,40,120")
    parser.add_argument("--pancreas", action="store_true", help="also pancreas with the cell-cycle score (seed 0)")
    args = parser.parse_args()
    fv.settings.verbosity, fv.settings.progress_bar = "warning", False
    rates, steps = [float(r) for r in args.rates.split(",")], [int(s) for s in args.steps.split(",")]
    means = defaultdict(list)
    designs = [(g, seed) for g in (0.1, 0.3, 1.0) for seed in range(args.seeds)] + [(None, s) for s in range(args.seeds)]
    for growth, seed in designs:
        adata = _scvelo_simulation(seed) if growth is None else _growth_simulation(growth, seed)
        table = stochastic_velocity_genes(adata)
        genes = table["velocity_genes"].to_numpy(bool)
        scores = {"scvelo_stochastic": _cosine(adata, adata.layers["Mu"] - table["gamma"].to_numpy() * adata.layers["Ms"], genes)}
        for rate in rates:
            for n in steps:
                scores[f"rate {rate:g}, steps {n}"] = _cosine(adata, fit(adata, "true_turnover", rate, n, seed).layers["velocity"], genes)
            start = fit(adata, "true_turnover", rate, 0, seed)
            scores[f"rate {rate:g}, spliced clock"] = _cosine(adata, spliced_clock_velocity(adata, start, "true_turnover", rate), genes)
        design = "scVelo's simulator" if growth is None else f"growth {growth:g}"
        for name, value in scores.items():
            means[(design, name)].append(value)
        print(f"{design}, seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    print("\nmean cosine to the true velocity over seeds")
    labels = list(dict.fromkeys(name for _, name in means))
    designs = list(dict.fromkeys(design for design, _ in means))
    print("| variant | " + " | ".join(designs) + " | growth mean | two designs weighted equally |")
    print("|---|" + "---|" * (len(designs) + 2))
    for name in labels:
        row = [np.mean(means[(d, name)]) for d in designs]
        growth_mean = np.mean(row[:-1])
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {growth_mean:.3f} | {(growth_mean + row[-1]) / 2:.3f} |")
    if args.pancreas:
        from fluxvelo.benchmark._datasets import prepare

        prep = prepare("pancreas_2000", download=False)
        print("\npancreas, cell-cycle score, seed 0 (for information; nothing is chosen on it)")
        for rate in rates:
            for n in steps:
                print(f"rate {rate:g}, steps {n}: {pancreas_scores(fit(prep.adata, 'cell_cycle', rate, n, 0), prep)}", flush=True)
            start = fit(prep.adata, "cell_cycle", rate, 0, 0)
            start.layers["velocity"] = spliced_clock_velocity(start, start, "cell_cycle", rate)
            print(f"rate {rate:g}, spliced clock: {pancreas_scores(start, prep)}", flush=True)


if __name__ == "__main__":
    main()
