"""fluxvelo.pp against scVelo / scanpy on the shared real data."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from conftest import shared_file
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse

import fluxvelo as fv
from fluxvelo.pp import _checks

scv = pytest.importorskip("scvelo")

OBS_KEYS = ["initial_size_unspliced", "initial_size_spliced", "initial_size", "n_counts"]


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def raw50() -> dict[str, ad.AnnData]:
    with warnings.catch_warnings():  # scVelo's fixtures use an old h5ad encoding
        warnings.simplefilter("ignore")
        return {name: ad.read_h5ad(shared_file(f"{name}_50obs.h5ad")) for name in ("pancreas", "dentategyrus")}


@pytest.fixture(scope="module")
def pancreas300() -> ad.AnnData:
    full = ad.read_h5ad(shared_file("pancreas_3696x2000.h5ad"))
    idx = np.sort(np.random.default_rng(0).choice(full.n_obs, 300, replace=False))
    return full[idx].copy()


def _dense(x):
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _scv(fn, *args, **kwargs):
    """Call scVelo with its deprecation chatter silenced (record=True: scVelo resets the filters itself)."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _assert_same_adata(a: ad.AnnData, b: ad.AnnData) -> None:
    """Exact equality of shape, names, X, layers, obs/var and the keys of the other slots."""
    assert a.shape == b.shape
    assert a.obs_names.equals(b.obs_names) and a.var_names.equals(b.var_names)
    assert_array_equal(_dense(a.X), _dense(b.X))
    assert set(a.layers) == set(b.layers)
    for k in a.layers:
        assert_array_equal(_dense(a.layers[k]), _dense(b.layers[k]))
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    for attr in ("uns", "obsm", "obsp", "varm"):
        assert set(getattr(a, attr)) == set(getattr(b, attr)), attr


def _normalized(raw: ad.AnnData) -> ad.AnnData:
    a = raw.copy()
    fv.pp.filter_and_normalize(a)
    return a


# ---------------------------------------------------------------- filter_and_normalize


@pytest.mark.parametrize("name", ["pancreas", "dentategyrus"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_shared_counts=20),
        dict(min_shared_counts=5, min_counts=3),
        dict(min_shared_counts=None),  # > 3,000 genes remain: var['gene_count_corr'] too
    ],
)
@pytest.mark.parametrize("log", [False, True])
def test_filter_and_normalize_matches_scvelo(raw50, name, kwargs, log):
    raw = raw50[name]
    ref = raw.copy()
    _scv(scv.pp.filter_and_normalize, ref, **kwargs)
    if log:
        sc.pp.log1p(ref)
    ours = fv.pp.filter_and_normalize(raw, log=log, copy=True, **kwargs)

    assert ours.var_names.equals(ref.var_names) and ours.obs_names.equals(ref.obs_names)
    for key in ("X", "spliced", "unspliced", "ambiguous"):
        if key != "X" and key not in raw.layers:
            continue
        x, y = (ref.X, ours.X) if key == "X" else (ref.layers[key], ours.layers[key])
        assert sparse.issparse(y), f"{key} lost sparsity"
        assert y.dtype == x.dtype
        assert_allclose(_dense(y), _dense(x), rtol=1e-6, atol=1e-6, err_msg=key)
    assert set(OBS_KEYS) <= set(ours.obs)
    for key in ref.obs:
        assert_allclose(ours.obs[key].to_numpy(), ref.obs[key].to_numpy(), rtol=1e-6, err_msg=key)
    assert list(ours.var) == list(ref.var)
    if kwargs["min_shared_counts"] is None:
        assert "gene_count_corr" in ours.var
    for key in ref.var:
        assert_allclose(ours.var[key].to_numpy(), ref.var[key].to_numpy(), atol=1e-4, equal_nan=True, err_msg=key)
    assert ("log1p" in ours.uns) == log


def test_filter_and_normalize_hvg_matches_scanpy(raw50):
    raw = raw50["pancreas"]
    ref = raw.copy()
    _scv(scv.pp.filter_and_normalize, ref, min_shared_counts=10)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=300, subset=True)
    ours = fv.pp.filter_and_normalize(raw, min_shared_counts=10, n_top_genes=300, copy=True)

    assert ours.n_vars == 300
    assert ours.var_names.equals(ref.var_names)
    assert_allclose(_dense(ours.X), _dense(ref.X), rtol=1e-6, atol=1e-6)
    assert_allclose(_dense(ours.layers["spliced"]), _dense(ref.layers["spliced"]), rtol=1e-6, atol=1e-6)
    for key in ("means", "dispersions", "dispersions_norm"):
        assert_allclose(ours.var[key].to_numpy(), ref.var[key].to_numpy(), rtol=1e-6, err_msg=key)
    assert ours.var["highly_variable"].all()


def test_filter_and_normalize_dense_integer_input(raw50):
    raw = raw50["dentategyrus"].copy()
    raw.X = _dense(raw.X).astype(np.int64)
    for k in ("spliced", "unspliced"):
        raw.layers[k] = _dense(raw.layers[k]).astype(np.int32)
    ref = raw.copy()
    _scv(scv.pp.filter_and_normalize, ref, min_shared_counts=20)
    ours = fv.pp.filter_and_normalize(raw, log=False, copy=True)
    for key in ("spliced", "unspliced"):
        y = ours.layers[key]
        assert isinstance(y, np.ndarray) and y.dtype == np.float32
        assert_allclose(y, ref.layers[key], rtol=1e-6)
    assert_allclose(ours.X, ref.X, rtol=1e-6)
    for key in OBS_KEYS:
        assert_allclose(ours.obs[key].to_numpy(), ref.obs[key].to_numpy(), rtol=1e-6)


def test_filter_and_normalize_copy_semantics(raw50):
    raw = raw50["pancreas"]
    before = raw.copy()
    out = fv.pp.filter_and_normalize(raw, copy=True)
    _assert_same_adata(raw, before)
    assert out is not raw and out.n_vars < raw.n_vars

    inplace = raw.copy()
    assert fv.pp.filter_and_normalize(inplace) is None
    _assert_same_adata(inplace, out)


def test_filter_and_normalize_twice_does_not_renormalize(raw50):
    once = _normalized(raw50["pancreas"])
    twice = once.copy()
    fv.pp.filter_and_normalize(twice, min_shared_counts=None)  # everything looks processed: nothing changes
    assert twice.shape == once.shape
    assert_array_equal(_dense(twice.X), _dense(once.X))
    for k in ("spliced", "unspliced"):
        assert_array_equal(_dense(twice.layers[k]), _dense(once.layers[k]))
    enforced = fv.pp.filter_and_normalize(once, min_shared_counts=None, enforce=True, log=False, copy=True)
    assert not np.allclose(_dense(enforced.layers["spliced"]), _dense(once.layers["spliced"]))


# ---------------------------------------------------------------- moments


@pytest.mark.parametrize("name", ["pancreas", "dentategyrus"])
@pytest.mark.parametrize("mode", ["connectivities", "distances"])
@pytest.mark.parametrize("n_neighbors", [15, 10])  # 10 < graph's 15: the graph is thinned per cell
def test_moments_match_scvelo_on_same_graph(raw50, name, mode, n_neighbors):
    a = _normalized(raw50[name])
    sc.pp.pca(a, n_comps=20)
    sc.pp.neighbors(a, n_neighbors=15, n_pcs=20, random_state=0)
    ref, ours = a.copy(), a.copy()
    _scv(scv.pp.moments, ref, n_neighbors=n_neighbors, mode=mode)
    fv.pp.moments(ours, n_neighbors=n_neighbors, mode=mode)

    for key in ("Ms", "Mu"):
        y = ours.layers[key]
        assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == a.shape
        assert_allclose(y, ref.layers[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # the graph was reused, not recomputed
    assert (ours.obsp["connectivities"] != a.obsp["connectivities"]).nnz == 0


def test_moments_is_neighbourhood_mean(raw50):
    """Independent check: Ms of each cell is the plain mean over itself and its graph neighbours."""
    a = _normalized(raw50["pancreas"])
    sc.pp.pca(a, n_comps=20)
    sc.pp.neighbors(a, n_neighbors=10, n_pcs=20, random_state=0)
    fv.pp.moments(a, n_neighbors=10)
    conn = a.obsp["connectivities"].toarray()
    s = _dense(a.layers["spliced"]).astype(np.float64)
    for i in (0, 17, 49):
        members = np.union1d(np.flatnonzero(conn[i] > 0), [i])
        assert_allclose(a.layers["Ms"][i], s[members].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pancreas", "dentategyrus"])
def test_moments_without_graph_match_scvelo(raw50, name):
    """Raw layers and no graph: normalisation, PCA and neighbours happen inside, as in scVelo."""
    raw = raw50[name]
    genes = _normalized(raw).var_names
    a = raw[:, genes].copy()
    ref, ours = a.copy(), a.copy()
    _scv(scv.pp.moments, ref, n_neighbors=20, n_pcs=None)
    fv.pp.moments(ours, n_neighbors=20, n_pcs=None)
    assert ours.uns["neighbors"]["params"]["n_neighbors"] == 20
    assert_allclose(ours.obsp["connectivities"].toarray(), ref.obsp["connectivities"].toarray(), atol=1e-6)
    assert_allclose(_dense(ours.X), _dense(ref.X), rtol=1e-6)
    assert_allclose(ours.obs["n_counts"].to_numpy(), ref.obs["n_counts"].to_numpy(), rtol=1e-6)
    for key in ("Ms", "Mu"):
        assert_allclose(ours.layers[key], ref.layers[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_moments_recomputes_smaller_graph_and_copy(raw50):
    a = _normalized(raw50["dentategyrus"])
    sc.pp.pca(a, n_comps=20)
    sc.pp.neighbors(a, n_neighbors=5, n_pcs=20, random_state=0)
    before = a.copy()
    out = fv.pp.moments(a, n_neighbors=12, n_pcs=20, copy=True)
    _assert_same_adata(a, before)
    assert "Ms" not in a.layers
    assert out.uns["neighbors"]["params"]["n_neighbors"] == 12
    assert ((out.obsp["distances"] > 0).sum(1) == 11).all()
    assert fv.pp.moments(a, n_neighbors=12, n_pcs=20) is None
    assert_array_equal(a.layers["Ms"], out.layers["Ms"])


# ---------------------------------------------------------------- recipe_flux


def test_recipe_flux_end_to_end_matches_reference_pipeline(pancreas300):
    raw = pancreas300
    before = raw.copy()
    ours = fv.pp.recipe_flux(raw, copy=True)
    _assert_same_adata(raw, before)

    # the paper's pipeline written out with scVelo and scanpy (no embedding: UMAP is checked on ours)
    ref = raw.copy()
    sc.pp.filter_cells(ref, min_counts=1)
    _scv(scv.pp.filter_and_normalize, ref, min_shared_counts=20)
    sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=2000, subset=True)
    sc.pp.pca(ref, n_comps=30, svd_solver="arpack", random_state=0)
    sc.pp.neighbors(ref, n_neighbors=30, n_pcs=30, random_state=0)
    _scv(scv.pp.moments, ref, n_neighbors=30, n_pcs=30)

    assert ours.obs_names.equals(ref.obs_names) and ours.var_names.equals(ref.var_names)
    assert 0 < ours.n_vars <= 2000
    assert ours.uns["neighbors"]["params"]["n_neighbors"] == 30
    assert ((ours.obsp["distances"] > 0).sum(1) == 29).all()
    assert ours.obsm["X_pca"].shape == (ours.n_obs, 30)
    assert_allclose(ours.obsp["connectivities"].toarray(), ref.obsp["connectivities"].toarray(), atol=1e-6)
    for key in ("Ms", "Mu"):
        assert ours.layers[key].dtype == np.float32 and ours.layers[key].shape == ours.shape
        assert_allclose(ours.layers[key], ref.layers[key], rtol=1e-5, atol=1e-5)
    assert ours.obsm["X_umap"].shape == (ours.n_obs, 2) and np.isfinite(ours.obsm["X_umap"]).all()
    assert sparse.issparse(ours.X) and sparse.issparse(ours.layers["spliced"])


def test_recipe_flux_inplace_filters_cells_and_keeps_embedding(raw50):
    a = raw50["pancreas"].copy()
    keep_rows = np.ones(a.n_obs)
    keep_rows[3] = 0  # an empty cell is dropped by min_counts=1
    a.X = sparse.csr_matrix(sparse.diags(keep_rows) @ a.X)
    a.obsm["X_umap"] = np.arange(2 * a.n_obs, dtype=float).reshape(-1, 2)
    expected_umap = np.delete(a.obsm["X_umap"], 3, axis=0)
    assert fv.pp.recipe_flux(a, n_neighbors=10, n_pcs=10) is None
    assert a.n_obs == 49 and raw50["pancreas"].obs_names[3] not in a.obs_names
    assert_array_equal(a.obsm["X_umap"], expected_umap)  # present already: not recomputed
    assert {"Ms", "Mu"} <= set(a.layers)
    assert a.uns["neighbors"]["params"]["n_neighbors"] == 10


def test_recipe_flux_tsne(raw50):
    out = fv.pp.recipe_flux(raw50["dentategyrus"], n_neighbors=10, n_pcs=10, embedding="tsne", copy=True)
    assert out.obsm["X_tsne"].shape == (out.n_obs, 2) and "X_umap" not in out.obsm
    assert np.isfinite(out.obsm["X_tsne"]).all()


# ---------------------------------------------------------------- bad input


def _small(raw50) -> ad.AnnData:
    return raw50["pancreas"][:, :3000].copy()


def _with_bad_value(raw50, value) -> ad.AnnData:
    a = _small(raw50)
    s = a.layers["spliced"].copy()
    s.data[0] = value
    a.layers["spliced"] = s
    return a


BAD_INPUTS = {
    "missing": (_small, KeyError, "unspliced"),
    "negative": (lambda r: _with_bad_value(r, -1.0), ValueError, "negative"),
    "nan": (lambda r: _with_bad_value(r, np.nan), ValueError, "NaN"),
    "inf": (lambda r: _with_bad_value(r, np.inf), ValueError, "infinite"),
    "empty": (lambda r: _small(r)[:0].copy(), ValueError, "empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("func", ["filter_and_normalize", "moments", "recipe_flux"])
def test_bad_input_raises_and_leaves_adata_unchanged(raw50, case, func):
    make, err, words = BAD_INPUTS[case]
    a = make(raw50)
    if case == "missing":
        del a.layers["unspliced"]
    before = a.copy()
    with pytest.raises(err, match=words):
        getattr(fv.pp, func)(a)
    _assert_same_adata(a, before)


def test_no_gene_left_raises_and_leaves_adata_unchanged(raw50):
    a = _small(raw50)
    before = a.copy()
    with pytest.raises(ValueError, match="lower the thresholds"):
        fv.pp.filter_and_normalize(a, min_shared_counts=10**9)
    _assert_same_adata(a, before)


def test_check_layers_message_names_layer_and_fix(raw50):
    a = _small(raw50)
    with pytest.raises(KeyError, match=r"layers 'Ms'/'Mu' missing: run fluxvelo.pp.moments\(adata\) first"):
        _checks.check_layers(a, ["Ms", "Mu"], hint="run fluxvelo.pp.moments(adata) first")
    with pytest.raises(KeyError, match="layer 'Mu' missing"):
        a.layers["Ms"] = a.layers["spliced"]
        _checks.check_layers(a, ["Ms", "Mu"], hint="run fluxvelo.pp.moments(adata) first")
    _checks.check_layers(a, ["spliced", "X"], hint="unused")  # present: no error
    _checks.check_counts(a)


@pytest.mark.parametrize("kwargs", [dict(mode="bad"), dict(method="bad")])
def test_moments_bad_options(raw50, kwargs):
    a = _small(raw50)
    with pytest.raises(ValueError, match="not supported"):
        fv.pp.moments(a, **kwargs)


def test_recipe_bad_embedding(raw50):
    with pytest.raises(ValueError, match="embedding"):
        fv.pp.recipe_flux(_small(raw50), embedding="pca")


# ---------------------------------------------------------------- conventions


def test_moments_on_view_writes_without_warning(raw50):
    a = _normalized(raw50["pancreas"])
    view = a[:30]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fv.pp.moments(view, n_neighbors=10, n_pcs=10)
    assert not view.is_view and view.layers["Ms"].shape == (30, a.n_vars)
    assert "Ms" not in a.layers


@pytest.mark.parametrize("name", fv.pp.__all__)
def test_public_signature_conventions(name):
    import inspect

    func = getattr(fv.pp, name)
    params = list(inspect.signature(func).parameters.values())
    assert params[0].name == "adata" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    assert "copy" in inspect.signature(func).parameters
    assert "Returns\n    -------" in func.__doc__
