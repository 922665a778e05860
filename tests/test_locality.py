"""Cells renumbered so that neighbours sit close in memory: the moments and the velocity graph do not change."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

import fluxvelo as fv
from fluxvelo import _locality
from fluxvelo.tl import _graph

da = pytest.importorskip("dask.array", reason="the Dask paths need dask: pip install 'fluxvelo[dask]'")


@pytest.fixture(scope="module")
def fitted():
    adata = fv.datasets.simulation(n_cells=600, n_genes=30, random_state=5)
    fv.pp.recipe_flux(adata, n_top_genes=None, embedding=None)
    fv.tl.velocity(adata, n_steps=10)
    rng = np.random.default_rng(0)  # the data's order carries no locality
    return adata[rng.permutation(adata.n_obs)].copy()


def test_renumber_keeps_each_rows_entries_and_their_order():
    rng = np.random.default_rng(1)
    m = sparse.random(50, 50, density=0.1, format="csr", random_state=2, dtype=np.float32)
    order = rng.permutation(50)
    out = _locality.renumber(m, order)
    np.testing.assert_array_equal(out.toarray(), m.toarray()[order][:, order])
    for k in (0, 17, 49):  # the same entries in the same order, columns renumbered
        row, new = slice(m.indptr[order[k]], m.indptr[order[k] + 1]), slice(out.indptr[k], out.indptr[k + 1])
        np.testing.assert_array_equal(order[out.indices[new]], m.indices[row])
        np.testing.assert_array_equal(out.data[new], m.data[row])


def test_locality_order_brings_neighbours_closer(fitted, monkeypatch):
    pattern = _graph.knn_indices(fitted.obsp["distances"])
    assert _locality.locality_order(pattern) is None  # below MIN_CELLS: nothing to gain
    monkeypatch.setattr(_locality, "MIN_CELLS", 0)
    order = _locality.locality_order(pattern)
    np.testing.assert_array_equal(np.sort(order), np.arange(fitted.n_obs))

    def spread(p):
        return np.median(np.abs(p.indices - np.repeat(np.arange(p.shape[0]), np.diff(p.indptr))))

    assert spread(_locality.renumber(pattern, order)) < spread(pattern) / 4


@pytest.mark.parametrize("lazy", [False, True])
def test_moments_are_the_same_to_the_bit(fitted, monkeypatch, lazy):
    adata = fitted.copy()
    for name in ("spliced", "unspliced"):
        if lazy:
            adata.layers[name] = da.from_array(np.asarray(adata.layers[name].todense()), chunks=(200, 8))
    before = adata.copy()
    fv.pp.moments(before)
    monkeypatch.setattr(_locality, "MIN_CELLS", 0)
    fv.pp.moments(adata)
    for name in ("Ms", "Mu"):
        got, want = (np.asarray(a.layers[name].compute() if lazy else a.layers[name]) for a in (adata, before))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("recurse", [1, 2])
@pytest.mark.parametrize("lazy", [False, True])
def test_velocity_graph_is_the_same_on_renumbered_cells(fitted, monkeypatch, backend, recurse, lazy):
    plain, renumbered = fitted.copy(), fitted.copy()
    if lazy:
        for name in ("Ms", "velocity"):
            renumbered.layers[name] = da.from_array(fitted.layers[name], chunks=(200, 8))
        monkeypatch.setattr(_graph, "LAZY_GRAPH_PAIRS", 4000)  # several blocks of cells
    fv.tl.velocity_graph(plain, backend=backend, n_recurse_neighbors=recurse)
    calls = []
    monkeypatch.setattr(_locality, "MIN_CELLS", 0)
    monkeypatch.setattr(_graph, "locality_order", lambda p: calls.append(o := _locality.locality_order(p)) or o)
    fv.tl.velocity_graph(renumbered, backend=backend, n_recurse_neighbors=recurse)
    assert len(calls) == 1 and not np.array_equal(calls[0], np.arange(fitted.n_obs))
    for key in ("velocity_graph", "velocity_graph_neg"):
        got, want = renumbered.uns[key], plain.uns[key]
        assert got.has_sorted_indices and got.nnz == want.nnz > 0
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.data, want.data, rtol=0, atol=1e-6)  # float32 rounding
    np.testing.assert_allclose(
        renumbered.obs["velocity_self_transition"], plain.obs["velocity_self_transition"], rtol=0, atol=1e-6
    )
