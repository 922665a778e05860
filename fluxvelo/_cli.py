"""The ``demo`` and ``velocity`` commands."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("fluxvelo")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="'default' or 'paper' (the reference settings)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sigma2", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:<i>'")


def _fit_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        sigma2=args.sigma2,
        random_state=args.seed,
        device=args.device,
    )


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="simulate a branching lineage, fit velocity, compare with the truth")
    p.add_argument("--out", type=Path, default=Path("fluxvelo_demo"), help="output folder")
    p.add_argument("--n-cells", type=int, default=1000)
    p.add_argument("--n-genes", type=int, default=100)
    _add_fit_options(p)
    p.set_defaults(func=run_demo)


def add_velocity_parser(sub) -> None:
    p = sub.add_parser("velocity", help="fit velocity on an .h5ad file")
    p.add_argument("input", type=Path, help="input .h5ad (with Ms/Mu, or raw spliced/unspliced with --preprocess)")
    p.add_argument("--out", type=Path, required=True, help="output .h5ad")
    p.add_argument("--preprocess", action="store_true", help="run fluxvelo.pp.recipe_flux first")
    _add_fit_options(p)
    p.set_defaults(func=run_velocity)


def run_velocity(args: argparse.Namespace) -> int:
    import anndata as ad

    from . import pp, settings, tl

    settings.verbosity = "info"
    adata = ad.read_h5ad(args.input)
    if args.preprocess:
        pp.recipe_flux(adata)
    tl.velocity(adata, **_fit_kwargs(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.out)
    logger.info("wrote %s", args.out)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from . import datasets, metrics, pl, pp, settings, tl

    settings.verbosity = "info"
    args.out.mkdir(parents=True, exist_ok=True)
    adata = datasets.simulation(n_cells=args.n_cells, n_genes=args.n_genes, random_state=args.seed)
    edges = [tuple(e) for e in adata.uns["true_edges"]]
    pp.recipe_flux(adata, embedding=None, n_top_genes=None)
    start = time.perf_counter()
    tl.velocity(adata, **_fit_kwargs(args))
    fit_time = time.perf_counter() - start
    tl.velocity_graph(adata)
    tl.velocity_embedding(adata, basis="umap")

    est, truth = adata.layers["velocity"], adata.layers["true_velocity"]
    genes = adata.var["velocity_genes"].to_numpy()
    a, b = est[:, genes], truth[:, genes]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    cbc, _ = metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=edges, basis="umap")
    summary = {
        "cells": int(adata.n_obs),
        "genes_fitted": int(genes.sum()),
        "fit_time_s": round(fit_time, 2),
        "cosine_to_true_velocity": round(float(np.mean(cos)), 4),
        "cbc_true_edges": round(float(cbc), 4),
        "consistency": round(float(metrics.consistency(adata)), 4),
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    pl.velocity_embedding_stream(adata, basis="umap", color="clusters", ax=axes[0], show=False)
    axes[0].set_title("fluxvelo velocity, simulated lineage")
    pl.loss_curve(adata, ax=axes[1], show=False)
    fig.tight_layout()
    fig.savefig(args.out / "velocity.png", dpi=120)
    adata.uns["true_edges"] = np.asarray(adata.uns["true_edges"], dtype=str)
    adata.write_h5ad(args.out / "velocity.h5ad")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'velocity.h5ad'}, {args.out / 'velocity.png'}, {args.out / 'summary.json'}")
    return 0
