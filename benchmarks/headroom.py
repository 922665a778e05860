"""How far the default's velocity is from the best that its form allows, on simulations with a known truth.

Every field of the family gives each gene the spliced velocity ``u - gamma' s`` (per unit of splicing time), read
at the cells' states projected onto 20 shared axes. On each simulator (fluxvelo's own, its growth variant with
turnover, scVelo's) and data seeds 0-2, the default fit's cosine to the true velocity, in each gene's splicing
clock (``shared_clock=False``), is set beside velocities that borrow from the truth, one part at a time:

- **best weights**: the fitted velocity with each gene scaled by the factor that best matches the truth (least
  squares per gene), which tells how much the relative weight of the genes costs;
- **true ratio**: ``u - r s`` with the simulator's ``gamma / beta`` (in the data's units: times the ratio of the
  unspliced and spliced layers' normalisations, read off the true abundances);
- **best ratio**: ``u - r s`` with the ``r`` per gene that best matches the truth once it is divided by one
  scale shared by all genes (the median of the best line's ``u`` coefficients below);
- **best line**: ``a u + b s`` per gene, both fitted to the truth, the ceiling of any per-gene velocity of this
  form at these states;
- **scVelo's ratio**: ``u - gamma s`` with scVelo stochastic's ``gamma``, at the same states.

Usage::

    python benchmarks/headroom.py [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fluxvelo as fv
from fluxvelo.benchmark._simulation import ground_truth_scores
from fluxvelo.tl._states import default_rank, low_rank_states

sys.path.insert(0, str(Path(__file__).parent))
from levers import SIMULATORS, prepare_study  # noqa: E402


def _cosine(adata, genes: np.ndarray, velocity: np.ndarray) -> float:
    """The benchmark's cosine to the true velocity, with ``velocity [cells, genes]`` in place of the fitted genes'."""
    layer = np.array(adata.layers["velocity"], np.float32)
    layer[:, genes] = velocity
    work = adata.copy()
    work.layers["velocity"] = layer
    return ground_truth_scores(work)[0]["velocity_cosine"]


def _per_gene_fit(columns: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """Least-squares coefficients per gene of ``truth [cells, genes]`` on the ``columns`` (each ``[cells, genes]``)."""
    design = np.stack(columns, -1)  # [cells, genes, k]
    return np.stack([np.linalg.lstsq(design[:, g], truth[:, g], rcond=None)[0] for g in range(truth.shape[1])])


def scores(name: str, seed: int) -> dict[str, float]:
    import scvelo as scv

    prep = prepare_study(name, seed)
    adata = prep.adata.copy()
    fv.tl.velocity(adata, shared_clock=False)  # each gene's splicing clock: the weights are one of the parts studied
    stochastic = prep.adata.copy()
    scv.tl.velocity(stochastic, mode="stochastic")
    estimate = np.asarray(adata.layers["velocity"], np.float64)
    truth = np.asarray(adata.layers["true_velocity"], np.float64)
    genes = np.flatnonzero(np.isfinite(estimate).all(0) & np.isfinite(truth).all(0))
    estimate, truth = estimate[:, genes], truth[:, genes]
    mu, ms = (np.asarray(adata.layers[k], np.float32)[:, genes] for k in ("Mu", "Ms"))
    blocks = torch.from_numpy(np.stack([mu.T, ms.T], -1))
    states = low_rank_states(blocks, default_rank(len(genes)), np.random.default_rng(seed)).double().numpy()
    u, s = states[..., 0].T, states[..., 1].T  # [cells, genes]

    weights = _per_gene_fit([estimate], truth)[:, 0]
    true_u, true_s = (np.asarray(adata.layers[k], np.float64)[:, genes] for k in ("true_unspliced", "true_spliced"))
    units = np.median(mu.sum(0) / true_u.sum(0)) / np.median(ms.sum(0) / true_s.sum(0))
    true_ratio = (adata.var["true_gamma"] / adata.var["true_beta"]).to_numpy(np.float64)[genes] * units
    line = _per_gene_fit([u, s], truth)
    best_ratio = ((u - truth / np.median(line[:, 0])) * s).sum(0) / (s * s).sum(0)
    gamma = stochastic.var["velocity_gamma"].to_numpy(np.float64)[genes]
    rows = {
        "default": _cosine(adata, genes, estimate),
        "best weights": _cosine(adata, genes, estimate * weights),
        "true ratio": _cosine(adata, genes, u - true_ratio * s),
        "best ratio": _cosine(adata, genes, u - best_ratio * s),
        "best line": _cosine(adata, genes, line[:, 0] * u + line[:, 1] * s),
        "scVelo's ratio": _cosine(adata, genes, u - np.nan_to_num(gamma) * s),
    }
    rows["ratio: log-correlation with the best, fitted"] = _log_correlation(_ratio(estimate, u, s), best_ratio)
    rows["ratio: log-correlation with the best, true"] = _log_correlation(true_ratio, best_ratio)
    return rows


def _ratio(velocity: np.ndarray, u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The ``r`` of a velocity ``w (u - r s)`` per gene."""
    coef = _per_gene_fit([u, s], velocity)
    return -coef[:, 1] / coef[:, 0]


def _log_correlation(a: np.ndarray, b: np.ndarray) -> float:
    keep = (a > 0) & (b > 0)
    return float(np.corrcoef(np.log(a[keep]), np.log(b[keep]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="data seeds of the simulators")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("fluxvelo").setLevel(logging.WARNING)
    rows = []
    for name in SIMULATORS:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = {"dataset": name, "seed": seed, **scores(name, seed)}
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            rows.append(row)
    table = pd.DataFrame(rows).drop(columns="seed").groupby("dataset", sort=False).mean().T
    print("\nmeans over the data seeds (cosine to the true velocity, unless named otherwise)")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
