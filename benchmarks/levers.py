"""Levers for direction, measured after the default fit: the mean local velocity, a permutation score, cell cycle,
the fit's stationarity, the unspliced velocity.

1. **Mean local velocity.** Under drift ``f``, unit diffusion and density ``p`` (the fit's scaled coordinates),
   the mean velocity of the cells at ``x`` is ``f - grad log p``: the drift less the pull that holds the
   spread against diffusion. Its spliced component replaces the drift's, with ``grad log p`` from a Gaussian
   kernel density per gene (bandwidth ``h`` in the scaled units, where each gene has standard deviation 10;
   1,500 random reference cells) and a weight ``c`` on it (1 is the model's own).
2. **Permutation score** (after veloVI's): the default fit again on data whose ``Mu`` is permuted across cells,
   and per gene the relative rise of the fit's loss, ``(loss_permuted - loss) / |loss|``. Genes whose
   unspliced-spliced pairing the fit uses should lose most. The velocity graph then runs on genes chosen with it.
3. **Cell-cycle genes** (where the cell-cycle score exists): the velocity genes less those whose ``Ms``
   correlates with the score by more than a threshold.
4. **Stationarity** (``var['fit_stationarity']``, how far each gene's fitted field is from the balance it was
   fitted to): the velocity genes less the least stationary quarter or half, and, as a control, less the most
   stationary ones.

5. **The unspliced velocity too** (``joint``): the velocity graph on the velocity genes' ``(Ms, w Mu)`` and
   ``(velocity, w velocity_u)`` side by side (weights ``w`` 0.5 and 1), and on ``Mu`` and ``velocity_u`` alone. The
   spliced velocity of every field is ``u - gamma' s``; the unspliced one is where the fitted drive enters.

None changes the fit; each rescores one default fit (seed 0) with the benchmark's metrics.

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/levers.py [--levers mean_local,permutation,cell_cycle,stationarity,joint]
"""

from __future__ import annotations

import argparse
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import torch

import fluxvelo as fv
from fluxvelo.benchmark._datasets import prepare
from fluxvelo.benchmark._simulation import ground_truth_scores
from fluxvelo.tl._turnover import MIN_CELL_CYCLE_GENES, _cell_cycle_positions, cell_cycle_score


def kde_score(x: np.ndarray, bandwidth: float, n_reference: int = 1500, seed: int = 0) -> np.ndarray:
    """``grad log p`` at each cell of ``x [genes, cells, 2]``: a Gaussian kernel density per gene."""
    rng = np.random.default_rng(seed)
    reference = rng.choice(x.shape[1], size=min(n_reference, x.shape[1]), replace=False)
    x = torch.from_numpy(x)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], 64):
        xg = x[start : start + 64]
        offsets = xg[:, reference][:, None] - xg[:, :, None]  # [genes, cells, references, 2]
        weights = torch.softmax(-(offsets**2).sum(-1) / (2 * bandwidth**2), dim=-1)
        out[start : start + 64] = (weights[..., None] * offsets).sum(2) / bandwidth**2
    return out.numpy()


#: The simulators of the direction studies: fluxvelo's own, its growth variant with turnover, scVelo's.
SIMULATORS = ("simulation", "growth_simulation", "scvelo_simulation")


def study_datasets(seeds: str, pancreas: bool) -> list[tuple[str, int | None]]:
    """``(name, data seed)`` of every simulator at each of the comma-separated ``seeds``, then pancreas (seed None)."""
    datasets = [(name, seed) for name in SIMULATORS for seed in (int(s) for s in seeds.split(","))]
    return datasets + [("pancreas_2000", None)] if pancreas else datasets


def study_args(doc: str, option: str, default: str, flags: tuple[str, ...] = ()) -> argparse.Namespace:
    """The command line of a study on the simulators: ``--<option>`` (the comma-separated values to try), ``--seeds``,
    ``--pancreas`` and the study's own on/off ``flags``; then :func:`quiet`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{option}", default=default)
    parser.add_argument("--seeds", default="0,1,2", help="data seeds of the simulators")
    parser.add_argument("--pancreas", action="store_true")
    for flag in flags:
        parser.add_argument(f"--{flag}", action="store_true")
    args = parser.parse_args()
    quiet()
    return args


def quiet() -> None:
    """Silence warnings and fluxvelo's and scVelo's logs, which would bury a study's tables."""
    warnings.filterwarnings("ignore")
    logging.getLogger("fluxvelo").setLevel(logging.WARNING)
    import scvelo as scv

    scv.settings.verbosity = 0


def prepare_study(name: str, seed: int | None):
    """The benchmark's preprocessing of one study data set (a simulator at data seed ``seed``, or pancreas)."""
    return prepare(name, download=False, simulation_options=None if seed is None else {"random_state": seed})


def evaluate(adata, prep) -> dict[str, float]:
    """CBC, consistency and, on simulations, the cosine to the true velocity."""
    work = adata.copy()
    fv.tl.velocity_graph(work)
    fv.tl.velocity_embedding(work, basis=prep.basis)
    cbc, edges = fv.metrics.cross_boundary_correctness(
        work, cluster_key=prep.cluster_key, edges=prep.edges, basis=prep.basis
    )
    row = {"CBC": cbc, "consistency": fv.metrics.consistency(work)}
    if "true_velocity" in work.layers:
        row["cosine"] = ground_truth_scores(work)[0]["velocity_cosine"]
    row["edges"] = " ".join(f"{v:.2f}" for v in edges.iloc[:, 2])
    return row


def mean_local_velocity(adata, bandwidths, weights) -> dict[str, object]:
    """Variants of ``adata`` whose spliced velocity is ``f - c grad log p`` (in the layer's units)."""
    fitted = np.flatnonzero(np.isfinite(adata.var["fit_beta"].to_numpy()))
    scale_u, scale_s, beta = (adata.var[k].to_numpy()[fitted] for k in ("fit_scaling_u", "fit_scaling_s", "fit_beta"))
    ms, mu = adata.layers["Ms"][:, fitted], adata.layers["Mu"][:, fitted]
    x = np.stack([(mu / scale_u).T, (ms / scale_s).T], -1).astype(np.float32)
    variants = {}
    for h in bandwidths:
        score_s = kde_score(x, h)[..., 1].T
        for c in weights:
            work = adata.copy()
            # 'splicing' time: the scaled field times scale_s * time_scale = scale_u / beta
            work.layers["velocity"][:, fitted] -= c * score_s * (scale_u / beta)
            variants[f"mean local velocity, h {h:g}, c {c:g}"] = work
    return variants


def permutation_gap(prep, fitted, seed: int) -> np.ndarray:
    """Relative rise of the per-gene fit loss of ``fitted`` when ``Mu`` is permuted across cells."""
    shuffled = prep.adata.copy()
    shuffled.layers["Mu"] = shuffled.layers["Mu"][np.random.default_rng(seed + 1).permutation(shuffled.n_obs)]
    fv.tl.velocity(shuffled, random_state=seed)
    loss, loss_shuffled = fitted.var["fit_loss"].to_numpy(), shuffled.var["fit_loss"].to_numpy()
    return (loss_shuffled - loss) / np.abs(loss)


def cell_cycle_correlation(adata) -> np.ndarray:
    """Per gene, the correlation over cells of ``Ms`` with the cell-cycle score."""
    score = cell_cycle_score(adata)
    ms = adata.layers["Ms"] - adata.layers["Ms"].mean(0)
    centred = score - score.mean()
    return (ms * centred[:, None]).sum(0) / (np.sqrt((ms**2).sum(0) * (centred**2).sum()) + 1e-12)


def stationarity_genes(adata, chosen: np.ndarray) -> dict[str, np.ndarray]:
    """The velocity genes less the least (or, as a control, the most) stationary quarter and half of them."""
    stationarity = adata.var["fit_stationarity"].to_numpy()
    variants = {}
    for share in (0.25, 0.5):
        low, high = np.nanquantile(stationarity[chosen], [share, 1 - share])
        variants[f"genes: without the least stationary {share:.0%}"] = chosen & (stationarity <= high)
        variants[f"genes: without the most stationary {share:.0%}"] = chosen & (stationarity >= low)
    return variants


def joint_velocity(adata, genes: np.ndarray, weight: float | None) -> ad.AnnData:
    """The velocity genes with ``(Ms, weight * Mu)`` as states and ``(velocity, weight * velocity_u)`` as velocities;
    ``weight=None`` keeps the unspliced half alone. The true velocity, where both halves are known, is laid out
    the same way."""
    def side_by_side(s_part, u_part):
        return u_part if weight is None else np.hstack([s_part, weight * u_part])

    sub = adata[:, genes]
    layers = {"Ms": side_by_side(sub.layers["Ms"], sub.layers["Mu"]),
              "velocity": side_by_side(sub.layers["velocity"], sub.layers["velocity_u"])}  # fmt: skip
    if "true_velocity" in sub.layers and "true_velocity_u" in sub.layers:  # else no cosine to the truth
        layers["true_velocity"] = side_by_side(sub.layers["true_velocity"], sub.layers["true_velocity_u"])
    n = layers["Ms"].shape[1]
    var = pd.DataFrame(index=[f"g{i}" for i in range(n)])
    out = ad.AnnData(np.zeros((sub.n_obs, n), np.float32), obs=sub.obs, var=var, obsm=dict(sub.obsm),
                     obsp=dict(sub.obsp), uns=dict(sub.uns), layers=layers)  # fmt: skip
    out.var["velocity_genes"] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="pancreas_2000,simulation,scvelo_simulation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levers", default="mean_local,permutation,cell_cycle,stationarity,joint")
    args = parser.parse_args()
    levers = set(args.levers.split(","))
    warnings.filterwarnings("ignore")
    logging.getLogger("fluxvelo").setLevel(logging.WARNING)
    lines = ["| dataset | variant | genes | CBC | consistency | cosine | edges |", "|---|---|---|---|---|---|---|"]
    for name in args.datasets.split(","):
        prep = prepare(name, download=False)
        adata = prep.adata.copy()
        fv.tl.velocity(adata, random_state=args.seed)
        chosen = adata.var["velocity_genes"].to_numpy(bool)
        variants = {"default (drift)": (adata, chosen)}
        if "mean_local" in levers:
            variants |= {k: (v, chosen) for k, v in mean_local_velocity(adata, (2.0, 4.0), (0.5, 1.0)).items()}
        if "permutation" in levers:
            gap = permutation_gap(prep, adata, args.seed)
            finite = np.isfinite(gap)
            print(f"{name}: permutation gap median {np.nanmedian(gap):.3f}, among velocity genes "
                  f"{np.nanmedian(gap[chosen]):.3f}, deciles {np.nanquantile(gap, [0.1, 0.9]).round(3)}", flush=True)  # fmt: skip
            top = np.zeros_like(chosen)
            top[np.argsort(-np.where(finite, gap, -np.inf))[: chosen.sum()]] = True
            variants["genes: top by permutation gap (as many)"] = (adata, top)
            variants["genes: scVelo's criterion and gap > 0"] = (adata, chosen & finite & (gap > 0))
        if "stationarity" in levers:
            variants |= {k: (adata, genes) for k, genes in stationarity_genes(adata, chosen).items()}
        if "cell_cycle" in levers and _cell_cycle_positions(adata).size >= MIN_CELL_CYCLE_GENES:
            r = cell_cycle_correlation(adata)
            print(f"{name}: median |r| with the cell-cycle score over the velocity genes {np.median(np.abs(r[chosen])):.2f}")
            for threshold in (0.5, 0.4, 0.3):
                variants[f"genes: without abs(r) > {threshold} with the cell-cycle score"] = (
                    adata, chosen & (np.abs(r) <= threshold))
        if "joint" in levers:
            for weight in (0.5, 1.0, None):
                label = "velocity_u alone" if weight is None else f"velocity and velocity_u side by side, w {weight:g}"
                joint = joint_velocity(adata, chosen, weight)
                variants[label] = (joint, joint.var["velocity_genes"].to_numpy(bool))
        for label, (work, genes) in variants.items():
            work = work.copy()
            work.var["velocity_genes"] = genes
            row = evaluate(work, prep)
            cosine = f"{row['cosine']:.3f}" if "cosine" in row else ""
            lines.append(f"| {name} | {label} | {genes.sum()} | {row['CBC']:.3f} | {row['consistency']:.3f} | "
                         f"{cosine} | {row['edges']} |")  # fmt: skip
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
