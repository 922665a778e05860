"""Atlas scale: the pipeline on Dask-backed AnnData read from a zarr store, per stage, against scVelo.

    python benchmarks/scale.py --cells 100000,300000,1000000 --scvelo-at 100000 --out scale

For each size a lineage is simulated chunk by chunk into a zarr store (so that making it never needs the memory
that the pipeline avoids). Each method then runs in its own process, so that its peak memory is its own:

- fluxvelo, lazily: ``pca_neighbors`` (scanpy's exact PCA of Dask arrays and its approximate kNN), ``moments``
  (``Ms``/``Mu``, written to the store),
  ``velocity`` (the fit, and ``layers['velocity']`` written to the store), ``velocity_graph``,
  ``velocity_embedding`` and cross-boundary correctness;
- scVelo's stochastic model on the same store read into memory, given fluxvelo's PCA and neighbour graph (so
  it has no neighbours stage), at the sizes named by ``--scvelo-at``.

Per stage: wall time, peak RSS of the process (sampled) and bytes written to the store. The table and a JSON
record go to ``--out``. This is a benchmark, not a test: it takes minutes to hours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_CLUSTERS = 6
CHUNK_CELLS = 20_000
CHUNK_GENES = 128


def simulate_store(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> None:
    """A one-lineage simulation (induction from a basal state, then repression back to it at a gene-specific
    time) written chunk by chunk.

    Abundances follow the exact splicing kinetics with per-gene rates; each cell is a Poisson draw of them,
    divided by its size factor (so the layers look normalised). ``obs`` holds the true time and a cluster per
    sixth of it, whose consecutive pairs are the true edges.
    """
    import zarr

    from fluxvelo.datasets._simulation import _evolve

    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(1.5, 0.5, n_genes)
    beta = rng.lognormal(0.0, 0.3, n_genes)
    gamma = rng.lognormal(-0.5, 0.4, n_genes)
    basal = 0.1 * alpha  # every gene starts and ends at a basal steady state, so no cell is empty
    u0, s0 = basal / beta, basal / gamma
    t_max = 20.0
    switch = rng.uniform(0.3, 0.8, n_genes) * t_max
    u_sw, s_sw = _evolve(u0, s0, alpha, beta, gamma, switch)

    root = zarr.open_group(str(path), mode="w")
    layers = {
        name: root.create_array(name, shape=(n_cells, n_genes), chunks=(CHUNK_CELLS, CHUNK_GENES), dtype="float32")
        for name in ("spliced", "unspliced")
    }
    time_ = root.create_array("true_time", shape=(n_cells,), chunks=(CHUNK_CELLS,), dtype="float32")
    for start in range(0, n_cells, CHUNK_CELLS):
        n = min(CHUNK_CELLS, n_cells - start)
        t = rng.uniform(0, t_max, n)[:, None]
        on = t < switch
        u_on, s_on = _evolve(u0, s0, alpha, beta, gamma, np.where(on, t, 0))
        u_off, s_off = _evolve(u_sw, s_sw, basal, beta, gamma, np.where(on, 0, t - switch))
        size = rng.lognormal(0, 0.2, (n, 1))
        for name, mean in (("unspliced", np.where(on, u_on, u_off)), ("spliced", np.where(on, s_on, s_off))):
            layers[name][start : start + n] = (rng.poisson(mean * size) / size).astype(np.float32)
        time_[start : start + n] = t[:, 0]


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _open(path: Path, layers: tuple[str, ...]):
    """An AnnData whose layers are Dask arrays on the store, with clusters by true time."""
    import anndata as ad
    import dask.array as da
    import pandas as pd
    import zarr

    root = zarr.open_group(str(path), mode="r")
    t = np.asarray(root["true_time"][:])
    edges = np.quantile(t, np.linspace(0, 1, N_CLUSTERS + 1)[1:-1])
    names = [f"c{i}" for i in range(N_CLUSTERS)]
    clusters = pd.Categorical([names[i] for i in np.searchsorted(edges, t)], categories=names)
    n_cells, n_genes = root["spliced"].shape
    adata = ad.AnnData(
        obs=pd.DataFrame({"clusters": clusters, "true_time": t}, index=[str(i) for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    for name in layers:
        adata.layers[name] = da.from_zarr(str(path / name))
    return adata


def _persist(adata, names: tuple[str, ...], path: Path) -> None:
    """Write lazy layers to the store and read them back lazily (later stages then read, not recompute)."""
    import dask.array as da

    for name in names:
        x = adata.layers[name].rechunk((CHUNK_CELLS, CHUNK_GENES))
        x.to_zarr(str(path / name), overwrite=True)
        adata.layers[name] = da.from_zarr(str(path / name))


EDGES = [(f"c{i}", f"c{i + 1}") for i in range(N_CLUSTERS - 1)]


def run_fluxvelo(path: Path, n_recurse_neighbors: int | None = None) -> dict:
    import dask.array as da
    import scanpy as sc

    import fluxvelo as fv
    from fluxvelo.benchmark._memory import Measure
    from fluxvelo.pp._moments import scanpy_neighbors

    stages = {}
    adata = _open(path, ("spliced", "unspliced"))
    adata.X = da.log1p(adata.layers["spliced"]).rechunk({1: -1})  # scanpy's Dask PCA reads whole cells

    def stage(name, func):
        before = _store_bytes(path)
        with Measure(interval=0.1) as m:
            out = func()
        stages[name] = {"seconds": m.seconds, "peak_mb": m.peak_mb, "start_mb": m.peak_mb - m.delta_mb,
                        "written_mb": (_store_bytes(path) - before) / 2**20}  # fmt: skip
        print(f"  {name}: {m.seconds:.1f} s, peak {m.peak_mb:.0f} MiB (from {m.peak_mb - m.delta_mb:.0f})", flush=True)
        return out

    def neighbours():
        sc.pp.pca(adata, n_comps=30, svd_solver="covariance_eigh", random_state=0)  # exact, one pass over X
        scanpy_neighbors(adata, n_neighbors=30, use_rep="X_pca", random_state=0)

    stage("pca_neighbors", neighbours)
    stage("moments", lambda: (fv.pp.moments(adata, n_neighbors=30), _persist(adata, ("Ms", "Mu"), path)))
    # kept for scVelo's run: the same graph for both
    graphs = {k: adata.obsp[k].tocsr() for k in ("connectivities", "distances")}
    parts = {f"{k}_{part}": getattr(g, part) for k, g in graphs.items() for part in ("data", "indices", "indptr")}
    np.savez(path / "graph.npz", pca=adata.obsm["X_pca"], **parts)
    stage("velocity", lambda: (fv.tl.velocity(adata), _persist(adata, ("velocity",), path)))
    stage("velocity_graph", lambda: fv.tl.velocity_graph(adata, n_recurse_neighbors=n_recurse_neighbors))
    stage("velocity_embedding", lambda: fv.tl.velocity_embedding(adata, basis="pca"))
    cbc = fv.metrics.cross_boundary_correctness
    score = stage("cbc", lambda: cbc(adata, cluster_key="clusters", edges=EDGES, basis="pca"))
    entries = sum(adata.uns[key].nnz for key in ("velocity_graph", "velocity_graph_neg"))
    return {"stages": stages, "cbc": float(score[0]), "fit_s": float(adata.uns["velocity_params"]["fit_time_s"]),
            "graph_entries": int(entries), "velocity_genes": int(adata.var["velocity_genes"].sum()),
            "n_recurse_neighbors": int(adata.uns["velocity_params"]["n_recurse_neighbors"])}  # fmt: skip


def run_scvelo(path: Path, graph_from: Path) -> dict:
    import scipy.sparse as sp
    import scvelo as scv

    from fluxvelo.benchmark._memory import Measure

    stages = {}
    with Measure(interval=0.1) as m:
        adata = _open(path, ("spliced", "unspliced"))
        for name in ("spliced", "unspliced"):
            adata.layers[name] = adata.layers[name].compute()
        graph = np.load(graph_from)
        for key in ("connectivities", "distances"):
            parts = (graph[f"{key}_data"], graph[f"{key}_indices"], graph[f"{key}_indptr"])
            adata.obsp[key] = sp.csr_matrix(parts, shape=(adata.n_obs, adata.n_obs))
        adata.obsm["X_pca"] = graph["pca"]
    stages["read"] = {"seconds": m.seconds, "peak_mb": m.peak_mb, "written_mb": 0.0}
    adata.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                              "params": {"n_neighbors": 30, "method": "umap"}}  # fmt: skip

    def stage(name, func):
        with Measure(interval=0.1) as m:
            out = func()
        stages[name] = {"seconds": m.seconds, "peak_mb": m.peak_mb, "written_mb": 0.0}
        print(f"  scVelo {name}: {m.seconds:.1f} s, peak {m.peak_mb:.0f} MiB", flush=True)
        return out

    stage("moments", lambda: scv.pp.moments(adata, n_pcs=None, n_neighbors=None))
    stage("velocity", lambda: scv.tl.velocity(adata, mode="stochastic"))
    stage("velocity_graph", lambda: scv.tl.velocity_graph(adata, n_jobs=1))
    stage("velocity_embedding", lambda: scv.tl.velocity_embedding(adata, basis="pca"))
    return {"stages": stages}


def _child(method: str, path: Path, out: Path, n_recurse_neighbors: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--store", str(path), "--json", str(out)]
    if n_recurse_neighbors is not None:
        cmd += ["--n-recurse-neighbors", str(n_recurse_neighbors)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="100000,300000,1000000", help="comma-separated numbers of cells")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--scvelo-at", default="100000", help="sizes at which scVelo runs too ('' for none)")
    parser.add_argument("--out", default="scale")
    parser.add_argument("--workdir", default=None, help="where the stores go (a temporary directory by default)")
    parser.add_argument("--keep-stores", action="store_true", help="keep each size's store after its run")
    parser.add_argument("--reuse-stores", action="store_true",
                        help="run on a store that an earlier --keep-stores run left in --workdir instead of simulating")
    parser.add_argument("--n-recurse-neighbors", type=int, default=None,
                        help="fluxvelo's velocity graph: neighbours of neighbours this deep (default: scVelo's 2)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        store = Path(args.store)
        if args.child == "fluxvelo":
            result = run_fluxvelo(store, args.n_recurse_neighbors)
        else:
            result = run_scvelo(store, store / "graph.npz")
        Path(args.json).write_text(json.dumps(result))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fluxvelo-scale-"))
    scvelo_at = {int(x) for x in args.scvelo_at.split(",") if x}
    records = []
    for n in (int(x) for x in args.cells.split(",")):
        store = work / f"sim_{n}.zarr"
        start = time.perf_counter()
        reused = args.reuse_stores and (store / "true_time").exists()
        if not reused:
            simulate_store(store, n, args.genes)
        sim_s = time.perf_counter() - start
        print(f"{n} cells: {'reused' if reused else f'simulated in {sim_s:.1f} s'} "
              f"({_store_bytes(store) / 2**30:.2f} GiB)", flush=True)  # fmt: skip
        record = {"n_cells": n, "n_genes": args.genes, "simulate_s": None if reused else sim_s}
        for method in ("fluxvelo", "scvelo") if n in scvelo_at else ("fluxvelo",):
            try:
                record[method] = _child(method, store, out / f"{method}_{n}.json", args.n_recurse_neighbors)
            except subprocess.CalledProcessError as err:  # keep the other numbers; the log has the error
                record[f"{method}_error"] = str(err)
        records.append(record)
        (out / "scale.json").write_text(json.dumps(records, indent=1))  # after each size, in case a later one fails
        if not args.keep_stores:
            shutil.rmtree(store, ignore_errors=True)
    table = _table(records)
    (out / "scale.md").write_text(table, encoding="utf-8")
    _plot(records, out / "scale.png")
    print(table)


def _plot(records: list[dict], path: Path) -> None:
    """Time and peak RSS of each fluxvelo stage against the number of cells (log-log), scVelo's as crosses."""
    import matplotlib.pyplot as plt

    records = [rec for rec in records if "fluxvelo" in rec]
    if not records:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    cells = [rec["n_cells"] for rec in records]
    with_scvelo = any("scvelo" in rec for rec in records)
    for stage in records[0]["fluxvelo"]["stages"]:
        for ax, key, unit in ((axes[0], "seconds", 1), (axes[1], "peak_mb", 1024)):
            values = [rec["fluxvelo"]["stages"][stage][key] / unit for rec in records]
            line = ax.plot(cells, values, "o-", label=stage)[0]
            theirs = [(rec["n_cells"], rec["scvelo"]["stages"][stage][key] / unit) for rec in records
                      if stage in rec.get("scvelo", {}).get("stages", {})]  # fmt: skip
            if theirs:
                ax.plot(*zip(*theirs), "x", color=line.get_color(), markersize=9)
    for ax, label in zip(axes, ("time (s)", "peak RSS (GiB)")):
        ax.set(xscale="log", yscale="log", xlabel="cells", ylabel=label)
    axes[1].legend(fontsize=8, title="fluxvelo (o); scVelo (x)" if with_scvelo else "fluxvelo", title_fontsize=8, loc="upper left",
                   bbox_to_anchor=(1.02, 1))  # outside the axes: inside, it hides points
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _table(records: list[dict]) -> str:
    lines = ["| cells | method | stage | time (s) | peak RSS (GiB) | written (MiB) |", "|---|---|---|---|---|---|"]
    for rec in records:
        for method in ("fluxvelo", "scvelo"):
            if method not in rec:
                continue
            stages = rec[method]["stages"]
            for stage, m in stages.items():
                row = f"{m['seconds']:.1f} | {m['peak_mb'] / 1024:.2f} | {m['written_mb']:.0f}"
                lines.append(f"| {rec['n_cells']:,} | {method} | {stage} | {row} |")
            # the stages both methods run (scVelo is given the PCA and graph, and reads the store first)
            shared = [m for s, m in stages.items() if s not in ("pca_neighbors", "read", "cbc")]
            seconds, peak = sum(m["seconds"] for m in shared), max(m["peak_mb"] for m in shared) / 1024
            lines.append(f"| {rec['n_cells']:,} | {method} | **moments to embedding** | {seconds:.1f} | {peak:.2f} | |")
            if "cbc" in rec[method]:
                lines.append(f"| {rec['n_cells']:,} | {method} | CBC | {rec[method]['cbc']:.3f} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
