"""scVelo and CellRank run unchanged on what fv.tl.velocity writes."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

import fluxvelo as fv

scv = pytest.importorskip("scvelo", reason="scVelo (the scvelo-modern distribution) is in the test extra")


@pytest.fixture(scope="module")
def fitted():
    adata = fv.datasets.simulation(n_cells=300, n_genes=30, random_state=2)
    fv.pp.moments(adata, n_neighbors=15, n_pcs=10)
    fv.tl.velocity(adata, epochs=1)
    return adata


def test_scvelo_graph_embedding_and_stream_plot(fitted):
    adata = fitted.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity_graph(adata, n_jobs=1, show_progress_bar=False)
        scv.tl.velocity_embedding(adata, basis="umap")
        ax = scv.pl.velocity_embedding_stream(adata, basis="umap", color="clusters", show=False)
    assert ax is not None
    assert np.isfinite(adata.obsm["velocity_umap"]).all()
    ours = fitted.copy()
    fv.tl.velocity_graph(ours)
    np.testing.assert_allclose(ours.uns["velocity_graph"].toarray(), adata.uns["velocity_graph"].toarray(), atol=1e-5)


def test_cellrank_velocity_kernel(fitted, monkeypatch):
    cr = pytest.importorskip("cellrank", reason="CellRank is installed by .ci/run, not by the test extra")
    import numpy.testing

    # CellRank 2.0.7 calls assert_array_equal(x=..., y=...), which NumPy >= 2.4 rejects; accept the old names.
    original = numpy.testing.assert_array_equal

    def assert_array_equal(*args, x=None, y=None, **kwargs):
        return original(*(args or (x, y)), **kwargs)

    monkeypatch.setattr(numpy.testing, "assert_array_equal", assert_array_equal)
    adata = fitted.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = cr.kernels.VelocityKernel(adata).compute_transition_matrix(show_progress_bar=False)
    T = kernel.transition_matrix
    assert T.shape == (adata.n_obs, adata.n_obs)
    np.testing.assert_allclose(np.asarray(T.sum(1)).ravel(), 1.0, atol=1e-6)
