"""The stochastic steady-state fit against scVelo's ``tl.velocity(mode='stochastic')`` on the same inputs."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
from conftest import shared_file

import fluxvelo as fv
from fluxvelo.tl._steady_state import QuantileFit, stochastic_velocity_genes

scv = pytest.importorskip("scvelo")

RTOL = 1e-5
FIXTURES = ["pancreas_100obs_preprocessed.h5ad", "dentategyrus_100obs_preprocessed.h5ad"]


# recipe_flux's neighbour graph compiles umap's numba kernels (about 20 s once per test session)
@pytest.fixture(scope="module", params=FIXTURES + [pytest.param("simulation", marks=pytest.mark.slow)])
def prepared(request) -> ad.AnnData:
    if request.param == "simulation":
        adata = fv.datasets.simulation(n_cells=300, n_genes=60, random_state=0)
        fv.pp.recipe_flux(adata, embedding=None)
        return adata
    return ad.read_h5ad(shared_file(request.param))


def _scvelo(adata: ad.AnnData, **kwargs):
    """scVelo's per-gene results, as the paper's benchmark computes them."""
    ref = adata.copy()
    scv.settings.verbosity = 0
    scv.tl.velocity(ref, mode="stochastic", mask_zero=False, **kwargs)
    return ref.var


def _assert_same(ours, ref) -> None:
    np.testing.assert_array_equal(ours["velocity_genes"].to_numpy(), ref["velocity_genes"].to_numpy(bool))
    np.testing.assert_allclose(ours["gamma"].to_numpy(), ref["velocity_gamma"].to_numpy(), rtol=RTOL, atol=0)
    np.testing.assert_allclose(ours["r2"].to_numpy(), ref["velocity_r2"].to_numpy(), rtol=RTOL, atol=0)
    np.testing.assert_allclose(ours["qreg_ratio"].to_numpy(), ref["velocity_qreg_ratio"].to_numpy(), rtol=RTOL, atol=0)


def test_matches_scvelo(prepared):
    ours = stochastic_velocity_genes(prepared)
    ref = _scvelo(prepared)
    assert list(ours.index) == list(prepared.var_names)
    # a real selection: some genes in, some out, and the stochastic gamma differs from the quantile ratio
    assert 0 < ours["velocity_genes"].sum() < prepared.n_vars
    genes = ours["velocity_genes"].to_numpy()
    assert not np.allclose(ours["gamma"][genes], ours["qreg_ratio"][genes], rtol=1e-3)
    _assert_same(ours, ref)


def test_writes_nothing(prepared):
    before = prepared.copy()
    stochastic_velocity_genes(prepared)
    assert list(prepared.var.columns) == list(before.var.columns)
    assert set(prepared.layers) == set(before.layers) and set(prepared.uns) == set(before.uns)
    np.testing.assert_array_equal(prepared.layers["Ms"], before.layers["Ms"])


def test_highly_variable_subset_matches_scvelo():
    adata = ad.read_h5ad(shared_file(FIXTURES[0]))
    before = stochastic_velocity_genes(adata)["velocity_genes"].to_numpy()
    adata.var["highly_variable"] = np.arange(adata.n_vars) % 2 == 0
    ours = stochastic_velocity_genes(adata)
    assert not ours["velocity_genes"].to_numpy()[1::2].any()
    assert ours["velocity_genes"].sum() < before.sum()
    _assert_same(ours, _scvelo(adata))
    without = stochastic_velocity_genes(adata, use_highly_variable=False)["velocity_genes"].to_numpy()
    np.testing.assert_array_equal(without, before)


def test_low_signal_fallback_matches_scvelo(caplog):
    adata = ad.read_h5ad(shared_file(FIXTURES[0]))
    with caplog.at_level(logging.WARNING, logger="fluxvelo"):
        ours = stochastic_velocity_genes(adata, min_r2=2.0)
    assert "80th percentile" in caplog.text
    # the r2 > 80th-percentile rule keeps a fifth of the genes
    assert ours["velocity_genes"].sum() == pytest.approx(adata.n_vars / 5, abs=1)
    _assert_same(ours, _scvelo(adata, min_r2=2.0))


def test_scalar_percentile_is_the_upper_one():
    adata = ad.read_h5ad(shared_file(FIXTURES[1]))
    pair = stochastic_velocity_genes(adata, perc=(5, 95))
    scalar = stochastic_velocity_genes(adata, perc=95)
    np.testing.assert_array_equal(pair.to_numpy(), scalar.to_numpy())
    other = stochastic_velocity_genes(adata, perc=(5, 80))
    assert not np.allclose(other["qreg_ratio"], pair["qreg_ratio"])
    _assert_same(other, _scvelo(adata, perc=[5, 80]))


def test_precomputed_quantile_fit_is_used_and_must_match_perc():
    adata = ad.read_h5ad(shared_file(FIXTURES[1]))
    fit = QuantileFit(adata.n_vars)
    fit.add(np.arange(adata.n_vars), adata.layers["Ms"], adata.layers["Mu"])
    same = stochastic_velocity_genes(adata, quantiles=fit)
    np.testing.assert_array_equal(same.to_numpy(), stochastic_velocity_genes(adata).to_numpy())
    with pytest.raises(ValueError, match="another perc"):
        stochastic_velocity_genes(adata, perc=(5, 80), quantiles=fit)


@pytest.mark.parametrize("perc", [(5, 95, 99), 101, (5, -1)])
def test_bad_percentile(perc):
    adata = ad.read_h5ad(shared_file(FIXTURES[1]))
    with pytest.raises(ValueError, match="perc"):
        stochastic_velocity_genes(adata, perc=perc)


@pytest.mark.parametrize("missing", ["Ms", "unspliced"])
def test_missing_layer(missing):
    adata = ad.read_h5ad(shared_file(FIXTURES[0]))
    del adata.layers[missing]
    with pytest.raises(KeyError, match=f"'{missing}' missing"):
        stochastic_velocity_genes(adata)


def test_missing_graph():
    adata = ad.read_h5ad(shared_file(FIXTURES[0]))
    del adata.obsp["connectivities"]
    with pytest.raises(KeyError, match="connectivities"):
        stochastic_velocity_genes(adata)


def test_other_layers():
    adata = ad.read_h5ad(shared_file(FIXTURES[0]))
    adata.layers["ms2"], adata.layers["mu2"] = adata.layers.pop("Ms"), adata.layers.pop("Mu")
    ours = stochastic_velocity_genes(adata, layer_spliced="ms2", layer_unspliced="mu2")
    adata.layers["Ms"], adata.layers["Mu"] = adata.layers["ms2"], adata.layers["mu2"]
    _assert_same(ours, _scvelo(adata))


def test_genes_need_positive_moments():
    adata = ad.read_h5ad(shared_file(FIXTURES[0]))
    adata.layers["Ms"][:, 0] = 0
    adata.layers["Mu"][:, 1] = 0
    ours = stochastic_velocity_genes(adata, min_r2=-np.inf, min_ratio=-np.inf)
    genes = ours["velocity_genes"].to_numpy()
    assert not genes[:2].any()
    assert genes[2:].all()
