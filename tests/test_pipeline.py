"""The public pipeline end to end: recipe_flux -> velocity -> graph -> embedding -> metrics.

Two things broke here before and are pinned now: scanpy's approximate neighbour search, which it uses above
8,192 cells (pynndescent 0.7 handed scanpy a ``csr_array``), and the sparse containers a user may bring
(SciPy's ``csr_matrix`` and ``csr_array``, or dense arrays), which every public function must accept.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

import fluxvelo as fv

APPROXIMATE_SEARCH_ABOVE = 8192  # scanpy uses pynndescent instead of an exact search above this many cells


def _run_pipeline(adata, basis="pca"):
    """Velocity, graph, embedding and the three metrics on a preprocessed AnnData; returns the metrics."""
    fv.tl.velocity(adata, random_state=0)
    fv.tl.velocity_graph(adata)
    fv.tl.velocity_embedding(adata, basis=basis)
    cbc, per_edge = fv.metrics.cross_boundary_correctness(
        adata, cluster_key="clusters", edges=adata.uns["true_edges"], basis=basis
    )
    return cbc, per_edge, fv.metrics.consistency(adata), fv.metrics.in_cluster_coherence(adata, cluster_key="clusters")[0]


@pytest.mark.slow
def test_pipeline_above_the_approximate_search_size():
    adata = fv.datasets.simulation(n_cells=9000, n_genes=12, random_state=0)
    assert adata.n_obs > APPROXIMATE_SEARCH_ABOVE
    fv.pp.recipe_flux(adata, n_top_genes=None, embedding=None)

    dist = adata.obsp["distances"]
    assert dist.shape == (9000, 9000)
    # 30 positive distances per cell: the approximate search keeps one more than the exact one (scanpy#3809)
    np.testing.assert_array_equal(np.asarray((sparse.csr_matrix(dist) > 0).sum(1)).ravel(), 30)
    assert adata.layers["Ms"].shape == (9000, adata.n_vars)

    cbc, per_edge, cons, coherence = _run_pipeline(adata)
    assert adata.obsm["velocity_pca"].shape == (9000, adata.obsm["X_pca"].shape[1])
    assert cbc > 0.1, per_edge  # the simulated lineage flows along its true edges
    assert 0 < cons <= 1 and 0 < coherence <= 1


def _as(kind: str, x):
    dense = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return {"dense": lambda: dense, "csr_matrix": lambda: sparse.csr_matrix(dense), "csr_array": lambda: sparse.csr_array(dense)}[kind]()


@pytest.fixture(scope="module")
def reference_run():
    adata = fv.datasets.simulation(n_cells=400, n_genes=30, random_state=1)
    fv.pp.recipe_flux(adata, n_top_genes=None, embedding=None)
    metrics = _run_pipeline(adata)
    return adata, metrics


@pytest.mark.parametrize("kind", ["dense", "csr_matrix", "csr_array"])
def test_counts_in_every_container_give_the_same_result(kind, reference_run):
    expected, (cbc, _, cons, coherence) = reference_run
    adata = fv.datasets.simulation(n_cells=400, n_genes=30, random_state=1)
    for name in ("spliced", "unspliced"):
        adata.layers[name] = _as(kind, adata.layers[name])
    adata.X = _as(kind, adata.X)

    fv.pp.recipe_flux(adata, n_top_genes=None, embedding=None)
    np.testing.assert_allclose(adata.layers["Ms"], expected.layers["Ms"], rtol=1e-5, atol=1e-6)
    got = _run_pipeline(adata)
    # float32 throughout (the shared-state projection too): equal to float32 precision of the velocities' scale
    scale = np.abs(expected.layers["velocity"]).max()
    np.testing.assert_allclose(adata.layers["velocity"], expected.layers["velocity"], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose([got[0], got[2], got[3]], [cbc, cons, coherence], rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "csr_array"])
def test_graph_and_layers_in_other_containers_downstream(kind, reference_run):
    """Moments, graph and velocity layers as another container (anndata 0.12 can hold csr_array)."""
    expected, (cbc, _, cons, coherence) = reference_run
    adata = expected.copy()
    for key in ("velocity", "velocity_u", "velocity_graph", "velocity_graph_neg", "velocity_pca"):
        adata.layers.pop(key, None), adata.uns.pop(key, None), adata.obsm.pop(key, None), adata.obsp.pop(key, None)
    for key in ("Ms", "Mu"):
        adata.layers[key] = _as(kind, adata.layers[key]) if kind == "csr_array" else adata.layers[key]
    for key in ("distances", "connectivities"):
        adata.obsp[key] = sparse.csr_array(adata.obsp[key]) if kind == "csr_array" else adata.obsp[key]

    fv.pp.moments(adata)  # the graph is reused, Ms/Mu recomputed from the normalised layers
    np.testing.assert_allclose(adata.layers["Ms"], expected.layers["Ms"], rtol=1e-5, atol=1e-6)
    got = _run_pipeline(adata)
    np.testing.assert_allclose([got[0], got[2], got[3]], [cbc, cons, coherence], rtol=1e-5)


def test_incompatible_knn_package_is_a_clear_error(monkeypatch):
    import scanpy as sc

    def broken(adata, **kwargs):  # what scanpy 1.11 raises on pynndescent 0.7's csr_array
        raise AttributeError("'csr_array' object has no attribute 'getnnz'")

    monkeypatch.setattr(sc.pp, "neighbors", broken)
    adata = fv.datasets.simulation(n_cells=100, n_genes=12, random_state=0)
    before = adata.copy()
    with pytest.raises(ImportError, match=r"pynndescent<0\.7"):
        fv.pp.recipe_flux(adata, n_top_genes=None, embedding=None)
    assert adata.n_obs == before.n_obs and set(adata.layers) == set(before.layers)  # left unchanged
