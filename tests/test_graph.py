"""fv.tl.velocity_graph / velocity_embedding / transition_matrix against scVelo on its own test fixtures."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import shared_file

import fluxvelo as fv

scv = pytest.importorskip("scvelo")

DATASETS = ["pancreas_50obs_preprocessed", "pancreas_100obs_preprocessed", "dentategyrus_100obs_preprocessed"]
TOL = 1e-5
_CACHE: dict = {}


def _load(name: str, mode: str = "stochastic") -> ad.AnnData:
    """A fixture with scVelo velocities and a 2-D test embedding (cached; always returns a fresh copy)."""
    if (name, mode) not in _CACHE:
        adata = ad.read_h5ad(shared_file(f"{name}.h5ad"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scv.tl.velocity(adata, mode=mode)
        adata.obsm["X_test"] = np.ascontiguousarray(adata.obsm["X_pca"][:, :2])
        _CACHE[name, mode] = adata
    return _CACHE[name, mode].copy()


def _scv_graph(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity_graph(adata, show_progress_bar=False, n_jobs=1, **kwargs)


def _scv_embedding(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity_embedding(adata, **kwargs)


def _dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def _assert_graphs_close(ours, theirs, vkey="velocity"):
    for key in (f"{vkey}_graph", f"{vkey}_graph_neg"):
        a, b = _dense(ours.uns[key]), _dense(theirs.uns[key])
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=key)
    np.testing.assert_allclose(
        ours.obs[f"{vkey}_self_transition"], theirs.obs[f"{vkey}_self_transition"], atol=TOL, rtol=0
    )
    assert ours.uns[f"{vkey}_graph"].nnz > 0 and ours.uns[f"{vkey}_graph_neg"].nnz > 0


def _snapshot(adata):
    return (
        sorted(adata.uns.keys()), list(adata.obs.columns), sorted(adata.obsm.keys()), sorted(adata.layers.keys()),
        dict(adata.uns.get("velocity_params", {})).keys(),
    )  # fmt: skip


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("mode", ["stochastic", "deterministic"])
def test_graph_matches_scvelo(name, mode):
    # stochastic -> scVelo's sqrt transform is on by default, deterministic -> off
    ours, theirs = _load(name, mode), _load(name, mode)
    fv.tl.velocity_graph(ours)
    _scv_graph(theirs)
    _assert_graphs_close(ours, theirs)
    assert ours.uns["velocity_params"]["n_recurse_neighbors"] == theirs.uns["velocity_params"]["n_recurse_neighbors"]
    assert ours.uns["velocity_params"]["mode_neighbors"] == "distances"
    assert ours.uns["velocity_params"]["mode"] == mode  # existing entries kept


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_neighbors": 10},
        {"n_recurse_neighbors": 1},
        {"n_recurse_neighbors": 3},
        {"sqrt_transform": False},
        {"approx": True},
        {"xkey": "spliced"},
    ],
    ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()),
)
def test_graph_options_match_scvelo(kwargs):
    ours, theirs = _load("pancreas_100obs_preprocessed"), _load("pancreas_100obs_preprocessed")
    fv.tl.velocity_graph(ours, **kwargs)
    _scv_graph(theirs, **kwargs)
    _assert_graphs_close(ours, theirs)


def test_graph_gene_subset_and_backends():
    base = _load("dentategyrus_100obs_preprocessed")
    genes = list(base.var_names[::3])
    theirs = base.copy()
    _scv_graph(theirs, gene_subset=genes)
    for backend in ("numpy", "numba"):
        ours = base.copy()
        fv.tl.velocity_graph(ours, gene_subset=genes, backend=backend)
        _assert_graphs_close(ours, theirs)
    # the subset matters: the default (velocity genes) graph differs
    default = base.copy()
    fv.tl.velocity_graph(default)
    assert np.abs(_dense(default.uns["velocity_graph"]) - _dense(theirs.uns["velocity_graph"])).max() > 1e-3


def test_graph_nan_genes_and_zero_velocity_cells():
    base = _load("pancreas_100obs_preprocessed")
    V = base.layers["velocity"].copy()
    vgenes = np.flatnonzero(base.var["velocity_genes"].values)
    V[3, vgenes[:4]] = np.nan  # one NaN drops the whole gene
    V[7] = 0.0  # a cell without velocity has no edges
    base.layers["velocity"] = V
    ours, theirs = base.copy(), base.copy()
    fv.tl.velocity_graph(ours)
    _scv_graph(theirs)
    _assert_graphs_close(ours, theirs)
    assert ours.uns["velocity_graph"][7].nnz == 0 and ours.uns["velocity_graph_neg"][7].nnz == 0


def test_graph_keeps_params_and_copy():
    adata = _load("pancreas_50obs_preprocessed")
    adata.uns["velocity_params"]["embeddings"] = ["umap"]
    adata.uns["velocity_params"]["mine"] = 1
    before = _snapshot(adata)
    out = fv.tl.velocity_graph(adata, copy=True)
    assert _snapshot(adata) == before and "velocity_graph" not in adata.uns
    assert out.uns["velocity_params"]["mine"] == 1 and "embeddings" not in out.uns["velocity_params"]
    assert fv.tl.velocity_graph(adata) is None and "velocity_graph" in adata.uns


def test_graph_bad_input_leaves_adata_unchanged():
    adata = _load("pancreas_50obs_preprocessed")
    before = _snapshot(adata)
    with pytest.raises(KeyError, match="velocity_nope"):
        fv.tl.velocity_graph(adata, vkey="velocity_nope")
    with pytest.raises(KeyError, match="fv.pp.moments"):
        fv.tl.velocity_graph(adata, xkey="Mx")
    with pytest.raises(ValueError, match="None of gene_subset"):
        fv.tl.velocity_graph(adata, gene_subset=["not_a_gene"])
    with pytest.raises(ValueError, match="exceeds"):
        fv.tl.velocity_graph(adata, n_neighbors=100)
    all_nan = adata.copy()
    all_nan.layers["velocity"] = np.full(adata.shape, np.nan, np.float32)
    with pytest.raises(ValueError, match="No genes left"):
        fv.tl.velocity_graph(all_nan)
    broken = adata.copy()
    dist = broken.obsp["distances"].tolil()
    dist.rows[4], dist.data[4] = [], []
    broken.obsp["distances"] = dist.tocsr()
    with pytest.raises(ValueError, match="no neighbours"):
        fv.tl.velocity_graph(broken)
    no_graph = adata.copy()
    del no_graph.obsp["distances"]
    with pytest.raises(KeyError, match="distances"):
        fv.tl.velocity_graph(no_graph)
    assert _snapshot(adata) == before
    for bad in (broken, no_graph, all_nan):
        assert "velocity_graph" not in bad.uns


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("basis", ["test", "pca"])
def test_embedding_matches_scvelo(name, basis):
    adata = _load(name)
    fv.tl.velocity_graph(adata)
    theirs = adata.copy()
    fv.tl.velocity_embedding(adata, basis=basis)
    _scv_embedding(theirs, basis=basis)
    key = f"velocity_{basis}"
    assert adata.obsm[key].shape == adata.obsm[f"X_{basis}"].shape
    np.testing.assert_allclose(adata.obsm[key], theirs.obsm[key], atol=TOL, rtol=0)
    assert np.abs(adata.obsm[key]).max() > 10 * TOL
    assert adata.uns["velocity_params"]["embeddings"] == [basis]


@pytest.mark.parametrize("backend", ["numba", "scipy"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"autoscale": False},
        {"scale": 3, "use_negative_cosines": False},
        {"self_transitions": False},
        {"self_transitions": False, "use_negative_cosines": False, "autoscale": False},
    ],
    ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()),
)
def test_embedding_options_match_scvelo(kwargs, backend, monkeypatch):
    from fluxvelo.tl import _embedding

    monkeypatch.setattr(_embedding, "_PAIR_ELEMENTS", 50)  # the scipy path in blocks of 25 transitions
    adata = _load("dentategyrus_100obs_preprocessed")
    fv.tl.velocity_graph(adata)
    theirs = adata.copy()
    fv.tl.velocity_embedding(adata, basis="test", backend=backend, **kwargs)
    _scv_embedding(theirs, basis="test", **kwargs)
    np.testing.assert_allclose(adata.obsm["velocity_test"], theirs.obsm["velocity_test"], atol=TOL, rtol=0)


def test_embedding_direct_pca_and_transition_matrix():
    adata = _load("pancreas_100obs_preprocessed")
    fv.tl.velocity_graph(adata)
    theirs = adata.copy()
    fv.tl.velocity_embedding(adata, basis="pca", direct_pca=True)
    _scv_embedding(theirs, basis="pca", direct_pca_projection=True)
    np.testing.assert_allclose(adata.obsm["velocity_pca"], theirs.obsm["velocity_pca"], atol=TOL, rtol=0)
    from scvelo.tools.transition_matrix import transition_matrix as scv_transition_matrix

    for neg in (True, False):
        for self_t in (True, False):
            ours = fv.tl.transition_matrix(adata, use_negative_cosines=neg, self_transitions=self_t)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = scv_transition_matrix(theirs, use_negative_cosines=neg, self_transitions=self_t)
            np.testing.assert_allclose(_dense(ours), _dense(ref), atol=TOL, rtol=0)


def test_embedding_bad_input_leaves_adata_unchanged():
    adata = _load("pancreas_50obs_preprocessed")
    with pytest.raises(KeyError, match="velocity_graph"):
        fv.tl.velocity_embedding(adata, basis="test")
    fv.tl.velocity_graph(adata)
    before = _snapshot(adata)
    with pytest.raises(KeyError, match="X_umap.*X_pca|X_pca.*X_umap"):
        fv.tl.velocity_embedding(adata, basis="umap")
    adata.obsm["X_bad"] = adata.obsm["X_test"].copy()
    adata.obsm["X_bad"][5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fv.tl.velocity_embedding(adata, basis="bad")
    with pytest.raises(ValueError, match="backend"):
        fv.tl.velocity_embedding(adata, basis="test", backend="gpu")
    del adata.obsm["X_bad"]
    subset = adata[:30].copy()  # uns graphs are not subsetted with the cells
    with pytest.raises(ValueError, match="velocity_graph again"):
        fv.tl.velocity_embedding(subset, basis="test")
    assert _snapshot(adata) == before
    out = fv.tl.velocity_embedding(adata, basis="X_test", copy=True)
    assert "velocity_test" in out.obsm and "velocity_test" not in adata.obsm


def test_pure_numpy_fallback_matches_scvelo(monkeypatch):
    # without numba: scipy neighbourhoods, chunked numpy cosines, explicit transition matrix
    from fluxvelo.tl import _embedding, _graph

    monkeypatch.setattr(_graph, "HAS_NUMBA", False)
    monkeypatch.setattr(_embedding, "HAS_NUMBA", False)
    ours = _load("pancreas_100obs_preprocessed")
    theirs = ours.copy()
    fv.tl.velocity_graph(ours, n_recurse_neighbors=3)
    _scv_graph(theirs, n_recurse_neighbors=3)
    _assert_graphs_close(ours, theirs)
    fv.tl.velocity_embedding(ours, basis="test")
    _scv_embedding(theirs, basis="test")
    np.testing.assert_allclose(ours.obsm["velocity_test"], theirs.obsm["velocity_test"], atol=TOL, rtol=0)
    with pytest.raises(ImportError, match="numba"):
        fv.tl.velocity_graph(ours, backend="numba")


@pytest.mark.parametrize("n_recurse", [1, 2, 3])
def test_neighbourhood_kernel_matches_sparse_powers(n_recurse, monkeypatch):
    # random wide-spread neighbours exercise both the sorted and the bitmap read-out of the kernel
    from fluxvelo.tl import _graph

    rng = np.random.default_rng(0)
    n, k = 3000, 3
    cols = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    dist = sp.csr_matrix((rng.random(n * k) + 0.1, cols.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    pattern = _graph.knn_indices(dist)
    fast = _graph.neighbourhood(pattern, n_recurse)
    monkeypatch.setattr(_graph, "HAS_NUMBA", False)
    ref = _graph.neighbourhood(pattern, n_recurse)
    assert fast.nnz == ref.nnz and (fast != ref).nnz == 0
    assert np.array_equal(fast.indptr, ref.indptr) and np.array_equal(fast.indices, ref.indices)  # sorted rows


def test_auto_uses_numpy_until_the_kernels_are_compiled(monkeypatch):
    """Before numba's kernels are compiled, 'auto' takes the numpy/scipy path and starts compiling them in child
    processes; the children's warm-up compiles the signatures of the real calls."""
    from fluxvelo import _jit
    from fluxvelo.tl import _embedding, _graph

    base = _load("dentategyrus_100obs_preprocessed")
    numpy_graph = base.copy()
    fv.tl.velocity_graph(numpy_graph, backend="numpy")
    fv.tl.velocity_embedding(numpy_graph, basis="test", backend="scipy")

    started, calls = [], []
    kernels = _jit.projection_kernels()
    monkeypatch.setattr(_graph, "ready", lambda dispatchers: False)
    monkeypatch.setattr(_embedding, "ready", lambda dispatchers: False)
    monkeypatch.setattr(_graph, "compile_in_children", lambda *args: started.append(args))
    monkeypatch.setattr(_embedding, "compile_in_children", lambda *args: started.append(args))
    monkeypatch.setattr(kernels, "pair_sums", lambda *a: calls.append("numba graph"))
    monkeypatch.setattr(kernels, "project", lambda *a: calls.append("numba embedding"))
    auto = base.copy()
    fv.tl.velocity_graph(auto)
    fv.tl.velocity_embedding(auto, basis="test")
    assert not calls and started == [_jit.PROJECTION_KERNELS] * 2
    np.testing.assert_array_equal(_dense(auto.uns["velocity_graph"]), _dense(numpy_graph.uns["velocity_graph"]))
    np.testing.assert_array_equal(auto.obsm["velocity_test"], numpy_graph.obsm["velocity_test"])
    monkeypatch.undo()
    kernels.warm_up(_jit.PROJECTION_KERNELS[2])  # what a child runs
    dispatchers = [getattr(kernels, name) for name in _jit.PROJECTION_KERNELS[2]]
    warmed = [set(k.signatures) for k in dispatchers]
    real = base.copy()
    fv.tl.velocity_graph(real, backend="numba")
    fv.tl.velocity_embedding(real, basis="test", backend="numba")
    assert [set(k.signatures) for k in dispatchers] == warmed  # the real calls compiled nothing new
