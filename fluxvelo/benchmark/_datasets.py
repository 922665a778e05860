"""Datasets of the benchmark: loading (registry or simulators) and the one preprocessing run per dataset."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from anndata import AnnData

#: Names that are simulated here rather than loaded; they carry a ground-truth velocity.
SIMULATIONS = ("simulation", "growth_simulation", "scvelo_simulation")
#: Settings of fluxvelo's simulator per name: 'growth_simulation' divides on the trunk, leaves along the branches
#: and carries five proliferation markers, so that turnover='auto' finds them as it would on real data.
SIMULATOR_SETTINGS = {
    "simulation": {},
    "growth_simulation": {"growth_rate": 0.3, "cell_cycle_genes": 5},
}
#: ``<dataset>`` + this suffix: the branching simulation with the registered dataset's number of cells.
STAND_IN = "_standin"


@dataclass
class Prepared:
    """A dataset after loading and preprocessing, with what the metrics need."""

    name: str
    kind: str  # 'real' or 'simulation'
    adata: AnnData
    cluster_key: str
    basis: str
    edges: list[tuple[str, str]]
    preprocessing: str
    seconds: float
    source: dict[str, Any] = field(default_factory=dict)


def canonical_name(name: str) -> str:
    """The registry name of ``name`` (simulations as they are); raises ValueError for unknown names."""
    from .. import datasets

    if name in SIMULATIONS:
        return name
    if name.endswith(STAND_IN):
        return datasets.info(name.removesuffix(STAND_IN)).name + STAND_IN
    return datasets.info(name).name


def default_datasets() -> list[str]:
    """The paper's five, the local pancreas benchmark file, and the two simulations."""
    from .. import datasets

    return [*datasets.available(tag="paper"), *datasets.available(tag="benchmark"), *SIMULATIONS]


def prepare(name: str, *, download: bool, simulation_options: dict[str, Any] | None = None) -> Prepared:
    """Load ``name`` and preprocess it once.

    Raises FileNotFoundError when the data are not available (not found locally and not downloadable).
    """
    from .. import datasets, pp

    start = time.perf_counter()
    opts = dict(simulation_options or {})
    if name in SIMULATOR_SETTINGS or name.endswith(STAND_IN):
        if name.endswith(STAND_IN):  # the size of a real dataset, to run the pipeline at that scale
            opts["n_cells"] = datasets.info(name.removesuffix(STAND_IN)).n_obs
        settings = {"n_cells": 1000, "n_genes": 100, "random_state": 0, **SIMULATOR_SETTINGS.get(name, {})}
        adata = datasets.simulation(**{**settings, **opts})
        edges = [tuple(e) for e in adata.uns["true_edges"]]
        pp.recipe_flux(adata, n_top_genes=None, embedding="umap")  # keeps the simulator's 2-D layout
        return Prepared(name, "simulation", adata, "clusters", "umap", edges,
                        f"fv.pp.recipe_flux(n_top_genes=None) on {adata.n_obs} simulated cells; "
                        "obsm['X_umap'] is the simulator's layout",
                        time.perf_counter() - start, {"params": dict(adata.uns["true_params"])})  # fmt: skip
    if name == "scvelo_simulation":
        import scanpy as sc

        from ._simulation import scvelo_simulation

        sim_opts = {"n_obs": opts.get("n_cells", 1000), "n_vars": opts.get("n_genes", 50),
                    "random_state": opts.get("random_state", 0)}  # fmt: skip
        adata = scvelo_simulation(**sim_opts)
        edges = [tuple(e) for e in adata.uns["true_edges"]]
        # continuous data with Gaussian noise, not counts: no library-size normalisation (as scVelo's own
        # simulation notebooks); kNN moments and a UMAP only
        pp.moments(adata, n_neighbors=30, n_pcs=30, random_state=0)
        sc.tl.umap(adata, random_state=0)
        return Prepared(name, "simulation", adata, "clusters", "umap", edges,
                        "fv.pp.moments(n_neighbors=30, n_pcs=30) on the unnormalised simulated abundances; "
                        "scanpy UMAP (random_state=0)",
                        time.perf_counter() - start, {"params": dict(adata.uns["true_params"])})  # fmt: skip

    entry = datasets.info(name)
    adata = datasets.load(name, download=download)
    basis = entry.basis or "umap"
    embedding = basis if basis in ("umap", "tsne") else None
    shipped = f"X_{basis}" in adata.obsm
    pp.recipe_flux(adata, embedding=embedding, random_state=0)
    if f"X_{basis}" not in adata.obsm:
        raise ValueError(f"Dataset {name!r} has no obsm['X_{basis}'] and it cannot be computed here.")
    if not entry.cluster_key or entry.cluster_key not in adata.obs:
        raise ValueError(
            f"Dataset {name!r} has no cluster labels (obs[{entry.cluster_key!r}]); CBC and coherence need them."
        )
    computed = "from the file" if shipped else "computed (random_state=0)"
    return Prepared(
        entry.name,
        "real",
        adata,
        entry.cluster_key,
        basis,
        list(entry.edges),
        f"fv.pp.recipe_flux (paper's recipe, random_state=0); X_{basis} {computed}",
        time.perf_counter() - start,
        {"file": entry.file, "sha256": entry.sha256},
    )
