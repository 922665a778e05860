"""The ``demo`` and ``velocity`` commands, and the checks of their input that run before any work."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("fluxvelo")

# The first bytes of an HDF5 file; a user block may put them at 512, 1024, 2048, ... bytes.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class UsageError(Exception):
    """An error in the command's input that the user can fix; printed as one line, without a traceback."""


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="'default' or 'paper' (the reference settings)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="passes over all cells (default: the preset's)")
    length.add_argument("--n-steps", type=int, default=None, help="optimiser steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sigma2", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:<i>'")
    p.add_argument("--n-jobs", type=int, default=None,
                   help="CPU threads (default: decided from the work and the free cores; -1: all cores)")  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="show the full traceback of an error")


def _fit_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        preset=args.preset,
        epochs=args.epochs,
        n_steps=args.n_steps,
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
    p.add_argument("--preprocess", action="store_true", help="run fluxvelo.pp.recipe_flux first (computes a UMAP)")
    p.add_argument("--basis", default=None,
                   help="also compute the velocity graph and the velocity embedding in obsm['X_<basis>'] "
                   "(e.g. umap) and write a stream plot next to --out (<out>.png)")  # fmt: skip
    p.add_argument("--color", default=None, help="obs column that colours the stream plot (needs --basis)")
    p.add_argument("--compact", action="store_true",
                   help="smaller output: drop the Ms/Mu layers and store every float array as float32")  # fmt: skip
    _add_fit_options(p)
    p.set_defaults(func=run_velocity)


def add_compile_parser(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the numba kernels now, once after installing (for shared or read-only installs)",
        description="Compile fluxvelo's numba kernels into numba's cache (the package's folder where it is "
        "writable). Run it once after installing into an environment that its users cannot write to (a shared "
        "conda environment, a container image): their first fit then loads the kernels instead of compiling "
        "them. The cache holds for machines with the same CPU.",
    )
    p.set_defaults(func=run_compile)


def run_compile(args: argparse.Namespace) -> int:
    from ._jit import compile_all

    start = time.perf_counter()
    for what, (compiled, folder) in compile_all().items():
        state = f"{compiled} compiled" if compiled else "all cached already"
        print(f"{what}: {state}; cache: {folder or 'none'}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _is_hdf5(path: Path) -> bool:
    size = path.stat().st_size
    with path.open("rb") as fh:
        offset = 0
        while offset + len(_HDF5_SIGNATURE) <= size:
            fh.seek(offset)
            if fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _h5ad_keys(path: Path) -> dict[str, set[str]]:
    """The keys of layers, obsm and obs in an .h5ad file, read without loading its arrays."""
    import h5py

    keys = {}
    with h5py.File(path, "r") as f:
        for group in ("layers", "obsm", "obs"):
            keys[group] = set(f[group].keys()) if group in f and isinstance(f[group], h5py.Group) else set()
    return keys


def _join(names) -> str:
    return " and ".join(f"'{n}'" for n in names)


def check_velocity_args(args: argparse.Namespace) -> None:
    """Every check of ``fluxvelo velocity``'s input that can be made before any work starts.

    Raises
    ------
    UsageError
        With a one-line message saying what is wrong and what to do.
    """
    src = args.input
    if not src.exists():
        raise UsageError(f"input file '{src}' does not exist")
    if src.is_dir():
        raise UsageError(f"input '{src}' is a folder; give an .h5ad file")
    if not _is_hdf5(src):
        raise UsageError(f"input '{src}' is not an .h5ad file (no HDF5 signature); convert it with anndata first")
    if args.color is not None and args.basis is None:
        raise UsageError("--color colours the stream plot, which needs --basis (e.g. --basis umap)")
    if args.out.exists() and args.out.is_dir():
        raise UsageError(f"--out '{args.out}' is a folder; give the path of the .h5ad file to write")
    try:
        keys = _h5ad_keys(src)
    except OSError as err:
        raise UsageError(f"input '{src}' could not be read as .h5ad ({err})") from err
    needed = ("spliced", "unspliced") if args.preprocess else ("Ms", "Mu")
    missing = [k for k in needed if k not in keys["layers"]]
    if missing and args.preprocess:
        raise UsageError(f"input '{src}' has no layer {_join(missing)}, which --preprocess needs (raw counts)")
    if missing:
        hint = (
            "; add --preprocess to compute them from the raw 'spliced' and 'unspliced' layers"
            if {"spliced", "unspliced"} <= keys["layers"]
            else "; give moments (Ms, Mu) or raw 'spliced' and 'unspliced' layers with --preprocess"
        )
        raise UsageError(f"input '{src}' has no layer {_join(missing)}{hint}")
    if args.basis is not None and not (args.preprocess and args.basis == "umap"):
        if f"X_{args.basis}" not in keys["obsm"]:
            held = ", ".join(sorted(k.removeprefix("X_") for k in keys["obsm"])) or "none"
            raise UsageError(
                f"input '{src}' has no embedding obsm['X_{args.basis}'] for --basis {args.basis} "
                f"(embeddings in the file: {held}; --preprocess computes umap)"
            )
    if args.color is not None and args.color not in keys["obs"]:
        raise UsageError(f"input '{src}' has no obs column '{args.color}' for --color")
    check_fit_args(args)


def check_fit_args(args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` for a zero ``--n-jobs`` or a ``--device`` that this machine lacks."""
    if args.n_jobs == 0:
        raise UsageError("--n-jobs takes a count of threads, or -1 for all cores (-2: all but one, ...)")
    from ._utils import resolve_device

    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        if str(args.device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UsageError(
                    f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__}); "
                    "use --device cpu or --device auto"
                ) from err
        raise UsageError(f"--device {args.device}: {err}") from err


def _compact(adata) -> None:
    """Drop the moments and store every floating-point array as float32, in place (uns: its top-level arrays)."""
    import numpy as np
    from scipy import sparse

    def f32(x):
        if sparse.issparse(x) or isinstance(x, np.ndarray):
            return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) and x.dtype != np.float32 else x
        return x

    for key in ("Ms", "Mu"):
        adata.layers.pop(key, None)
    if adata.X is not None:
        adata.X = f32(adata.X)
    for mapping in (adata.layers, adata.obsm, adata.varm, adata.obsp, adata.varp, adata.uns):
        for key in list(mapping.keys()):
            mapping[key] = f32(mapping[key])
    for frame in (adata.obs, adata.var):
        for col in frame.columns:
            if frame[col].dtype == np.float64:
                frame[col] = frame[col].astype(np.float32)


def run_velocity(args: argparse.Namespace) -> int:
    check_velocity_args(args)
    import anndata as ad

    from . import pl, pp, settings, tl

    settings.verbosity = "info"
    settings.n_jobs = args.n_jobs
    adata = ad.read_h5ad(args.input)
    if args.preprocess:
        pp.recipe_flux(adata)
    tl.velocity(adata, **_fit_kwargs(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.basis is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tl.velocity_graph(adata)
        tl.velocity_embedding(adata, basis=args.basis)
        fig, ax = plt.subplots(figsize=(6, 5))
        pl.velocity_embedding_stream(adata, basis=args.basis, color=args.color, ax=ax, show=False)
        png = args.out.with_suffix(".png")
        fig.savefig(png, dpi=120, bbox_inches="tight")
        plt.close(fig)
        logger.info("wrote %s", png)
    if args.compact:
        _compact(adata)
    adata.write_h5ad(args.out)
    logger.info("wrote %s", args.out)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    check_fit_args(args)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from . import datasets, metrics, pl, pp, settings, tl

    settings.verbosity = "info"
    settings.n_jobs = args.n_jobs
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
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'velocity.h5ad'}, {args.out / 'velocity.png'}, {args.out / 'summary.json'}")
    return 0
