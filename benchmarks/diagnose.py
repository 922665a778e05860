"""Where fluxvelo and scVelo disagree on pancreas, edge by edge and gene by gene, with pictures.

For every lineage edge A -> B, CBC asks whether a boundary cell of A moves towards its neighbours in B. The
velocity graph scores that move by the cosine, over velocity genes, between the cell's velocity and its
displacement ``Ms_j - Ms_i`` to a neighbour ``j``. That cosine is a sum over genes, so each gene's share of it,
averaged over the edge's boundary cells and their neighbours in B, says which genes drive the edge. The script:

- fits fluxvelo (default preset) and scVelo (stochastic) on the same preprocessed data;
- prints per-edge CBC of both and, for each edge, the genes with the largest shares and where the two disagree;
- draws the per-edge CBC bars, each method's velocity stream, the phase portraits of the genes that decide the
  edges fluxvelo gets most wrong (with the fitted field, its nullclines and scVelo's steady-state line), and the
  fitted against scVelo's degradation rates.

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/diagnose.py --out docs/_static [--seed 0] [--genes 3]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import fluxvelo as fv  # noqa: E402
from fluxvelo.benchmark._datasets import prepare  # noqa: E402


def gene_shares(adata, *, cluster_key: str, source: str, target: str) -> pd.Series:
    """Each velocity gene's mean share of ``cos(v_i, Ms_j - Ms_i)`` over boundary cells ``i`` of ``source`` and
    their kNN neighbours ``j`` in ``target``."""
    genes = adata.var["velocity_genes"].to_numpy(bool)
    V = np.nan_to_num(adata.layers["velocity"][:, genes])
    S = adata.layers["Ms"][:, genes]
    graph = adata.obsp["distances"].tocsr()
    labels = adata.obs[cluster_key].to_numpy()
    shares, count = np.zeros(genes.sum()), 0
    for i in np.flatnonzero(labels == source):
        nbrs = graph.indices[graph.indptr[i] : graph.indptr[i + 1]]
        nbrs = nbrs[labels[nbrs] == target]
        if not len(nbrs):
            continue
        v = V[i] / (np.linalg.norm(V[i]) or 1.0)
        d = S[nbrs] - S[i]
        d /= np.linalg.norm(d, axis=1, keepdims=True).clip(1e-12)
        shares += (d * v).mean(0)
        count += 1
    return pd.Series(shares / max(count, 1), index=adata.var_names[genes])


def fit_both(prep, seed: int):
    import scvelo as scv

    ours, theirs = prep.adata.copy(), prep.adata.copy()
    fv.tl.velocity(ours, random_state=seed)
    scv.settings.verbosity = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity(theirs, mode="stochastic")
    for a in (ours, theirs):
        fv.tl.velocity_graph(a)
        fv.tl.velocity_embedding(a, basis=prep.basis)
    return {"fluxvelo": ours, "scVelo stochastic": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("diagnosis"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genes", type=int, default=3, help="genes per edge in the phase portraits")
    parser.add_argument("--edges", type=int, default=2, help="edges drawn: those where fluxvelo trails most")
    parser.add_argument("--edge", action="append", default=["Pre-endocrine -> Epsilon"], help="an edge drawn as well")
    args = parser.parse_args()
    fv.settings.progress_bar = False
    fv.settings.verbosity = "warning"
    args.out.mkdir(parents=True, exist_ok=True)

    prep = prepare("pancreas_2000", download=False)
    fits = fit_both(prep, args.seed)
    per_edge = {}
    for name, a in fits.items():
        pooled, table = fv.metrics.cross_boundary_correctness(
            a, cluster_key=prep.cluster_key, edges=prep.edges, basis=prep.basis
        )
        per_edge[name] = (pooled, table)
        print(f"{name}: pooled CBC {pooled:.3f}, consistency {fv.metrics.consistency(a):.3f}, "
              f"{int(a.var['velocity_genes'].sum())} velocity genes")
    edges = pd.DataFrame({name: t["cbc"] for name, (_, t) in per_edge.items()})
    edges["difference"] = edges["fluxvelo"] - edges["scVelo stochastic"]
    print("\nper-edge CBC\n" + edges.round(3).to_markdown())

    ours, theirs = fits["fluxvelo"], fits["scVelo stochastic"]
    drawn = set(edges.sort_values("difference").index[: args.edges]) | set(args.edge)
    chosen: dict[str, list[str]] = {}
    for edge, row in edges.iterrows():
        source, target = (s.strip() for s in edge.split("->"))
        a = gene_shares(ours, cluster_key=prep.cluster_key, source=source, target=target)
        b = gene_shares(theirs, cluster_key=prep.cluster_key, source=source, target=target)
        both = pd.DataFrame({"fluxvelo": a, "scVelo": b}).fillna(0.0)
        both["gap"] = both["fluxvelo"] - both["scVelo"]
        print(f"\n{edge}: CBC fluxvelo {row['fluxvelo']:.3f}, scVelo {row['scVelo stochastic']:.3f}")
        print("  largest shares (fluxvelo):", ", ".join(f"{g} {v:+.3f}" for g, v in a.nlargest(5).items()))
        print("  most against the edge (fluxvelo):", ", ".join(f"{g} {v:+.3f}" for g, v in a.nsmallest(5).items()))
        gaps = both["gap"].loc[both["gap"].abs().nlargest(5).index]
        print("  largest disagreements (fluxvelo - scVelo):", ", ".join(f"{g} {v:+.3f}" for g, v in gaps.items()))
        if edge in drawn:
            chosen[edge] = list(both["gap"].abs().nlargest(args.genes).index)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    fv.pl.cbc_bars({name: t["cbc"] for name, (_, t) in per_edge.items()}, ax=ax, show=False)
    fig.tight_layout()
    fig.savefig(args.out / "diagnosis_cbc_edges.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (name, a) in zip(axes, fits.items()):
        fv.pl.velocity_embedding_stream(a, basis=prep.basis, color=prep.cluster_key, ax=ax, show=False,
                                        legend_loc="on data", legend_fontsize=7, title=name)  # fmt: skip
    fig.tight_layout()
    fig.savefig(args.out / "diagnosis_streams.png", dpi=110)
    plt.close(fig)

    gamma_scv = theirs.var["velocity_gamma"].to_numpy()
    for edge, genes in chosen.items():
        source, target = (s.strip() for s in edge.split("->"))
        fig, axes = plt.subplots(1, len(genes), figsize=(4.2 * len(genes), 3.8), squeeze=False)
        for ax, gene in zip(axes[0], genes):
            fv.pl.phase_portrait(ours, gene, color=prep.cluster_key, ax=ax, show=False, legend_loc=None, title=gene)
            s = ours[:, gene].layers["Ms"].ravel()
            grid = np.linspace(0, s.max(), 50)
            ax.plot(grid, gamma_scv[ours.var_names.get_loc(gene)] * grid, color="crimson", lw=1.2, ls=":",
                    label="scVelo steady state")  # fmt: skip
            mask = ours.obs[prep.cluster_key].isin([source, target]).to_numpy()
            ax.scatter(s[mask], ours[:, gene].layers["Mu"].ravel()[mask], s=3, facecolors="none",
                       edgecolors="k", linewidths=0.3, label=f"{source} / {target}")  # fmt: skip
            ax.legend(fontsize=6, loc="upper left")
        fig.suptitle(f"{edge}: the genes where fluxvelo's and scVelo's shares of the move differ most", fontsize=10)
        fig.tight_layout()
        name = edge.replace(" -> ", "_to_").replace(" ", "_")
        fig.savefig(args.out / f"diagnosis_{name}.png", dpi=110)
        plt.close(fig)

    gamma_ours = _gamma_prime(ours)
    keep = np.isfinite(gamma_ours) & (gamma_scv > 0)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    vg = ours.var["velocity_genes"].to_numpy(bool)
    ax.scatter(gamma_scv[keep & ~vg], gamma_ours[keep & ~vg], s=4, c="0.7", label="other genes")
    ax.scatter(gamma_scv[keep & vg], gamma_ours[keep & vg], s=4, c="C0", label="fluxvelo velocity genes")
    lims = [np.nanmin(gamma_scv[keep]), np.nanmax(gamma_scv[keep])]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="scVelo stochastic gamma", ylabel="fluxvelo gamma' (splicing time)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "diagnosis_gamma.png", dpi=110)
    plt.close(fig)
    ratio = np.log(gamma_ours[keep] / gamma_scv[keep])
    print(f"\nlog(gamma' fluxvelo / gamma scVelo) over {keep.sum()} genes: median {np.median(ratio):+.3f}, "
          f"10-90% [{np.percentile(ratio, 10):+.3f}, {np.percentile(ratio, 90):+.3f}]")
    gamma_swaps(ours, gamma_ours, gamma_scv)
    gamma_spread(prep.adata, seeds=range(args.seed, args.seed + 3))
    print(f"figures in {args.out}")


def _gamma_prime(adata) -> np.ndarray:
    """The fitted degradation rate in splicing time and original units: ``u - gamma' s`` is the velocity."""
    var = adata.var
    return (var["fit_gamma"] / var["fit_beta"] * var["fit_scaling_u"] / var["fit_scaling_s"]).to_numpy()


def gamma_spread(adata, seeds) -> None:
    """How much gamma' moves with the seed, against how far it is from scVelo's."""
    gammas = []
    for seed in seeds:
        work = adata.copy()
        fv.tl.velocity(work, random_state=seed)
        gammas.append(_gamma_prime(work))
    gammas = np.array(gammas)
    cv = np.nanmedian(gammas.std(0) / gammas.mean(0))
    print(f"\ngamma' over seeds {list(seeds)}: median coefficient of variation {cv:.3f}")


def gamma_swaps(adata, gamma_ours: np.ndarray, gamma_scv: np.ndarray) -> None:
    """Consistency of ``u - gamma s`` for other gammas: it depends on nothing else."""
    fitted = np.isfinite(gamma_ours)
    Mu, Ms = adata.layers["Mu"], adata.layers["Ms"]
    variants = {"fluxvelo's gamma'": gamma_ours, "scVelo's gamma": gamma_scv}
    variants.update({f"fluxvelo's gamma' x {f}": f * gamma_ours for f in (0.8, 0.9, 1.1, 1.25)})
    print("\nconsistency of u - gamma s (fluxvelo's fitted genes):")
    work = adata.copy()
    for name, gamma in variants.items():
        work.layers["velocity"] = np.where(fitted, Mu - np.nan_to_num(gamma) * Ms, np.nan).astype(np.float32)
        print(f"  {name:<28} {fv.metrics.consistency(work):.3f}")


if __name__ == "__main__":
    main()
