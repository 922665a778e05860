"""Where the fitted field is read: the cells' states on the leading axes that the fitted genes share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fluxvelo as fv
from fluxvelo.tl._states import low_rank_states as _low_rank_states


def low_rank_states(blocks: np.ndarray, rank: int, rng: np.random.Generator) -> np.ndarray:
    return _low_rank_states(torch.from_numpy(blocks), rank, rng).numpy()


def _exact_projection(blocks: np.ndarray, rank: int) -> np.ndarray:
    """The same projection from numpy's full SVD, written out directly."""
    n_genes, n_cells, _ = blocks.shape
    x = blocks.transpose(1, 0, 2).reshape(n_cells, -1).astype(np.float64)
    mean, scale = x.mean(0), x.std(0)
    _, _, vt = np.linalg.svd((x - mean) / scale, full_matrices=False)
    z = (x - mean) / scale @ vt[:rank].T @ vt[:rank]
    return (z * scale + mean).reshape(n_cells, n_genes, 2).transpose(1, 0, 2)


def _lineage(n_genes=40, n_cells=300, noise=0.3, seed=0):
    """States driven by three shared programmes, plus each gene's own noise: ``(noisy, clean)``."""
    rng = np.random.default_rng(seed)
    programmes = rng.standard_normal((n_cells, 3))
    clean = (programmes @ rng.standard_normal((3, 2 * n_genes)) + 5).reshape(n_cells, n_genes, 2).transpose(1, 0, 2)
    return (clean + noise * rng.standard_normal(clean.shape)).astype(np.float32), clean


def test_projection_equals_the_truncated_svd():
    noisy, _ = _lineage()
    given = noisy.copy()
    got = low_rank_states(noisy, 3, np.random.default_rng(1))
    np.testing.assert_array_equal(noisy, given)
    assert got.shape == noisy.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, _exact_projection(noisy, 3), atol=1e-4)


def test_projection_removes_the_genes_own_noise():
    noisy, clean = _lineage()
    projected = low_rank_states(noisy, 3, np.random.default_rng(0))
    assert np.abs(projected - clean).mean() < 0.4 * np.abs(noisy - clean).mean()


def test_full_rank_keeps_the_states_and_a_constant_column_is_kept():
    noisy, _ = _lineage(n_genes=5, n_cells=50)
    np.testing.assert_array_equal(low_rank_states(noisy, 10, np.random.default_rng(0)), noisy)
    noisy[2, :, 1] = 7.0
    out = low_rank_states(noisy, 3, np.random.default_rng(0))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[2, :, 1], 7.0, rtol=1e-6)


@pytest.fixture(scope="module")
def simulated():
    adata = fv.datasets.simulation(n_cells=300, n_genes=40, random_state=0)
    fv.pp.recipe_flux(adata, embedding=None, n_top_genes=None)
    return adata


def test_velocity_reads_the_field_at_the_projected_states(simulated):
    """The same fit read at the cells' states projected onto 5 axes: the velocity is the fitted line's
    ``u - gamma' s`` at the projected states, not at the smoothed ones."""
    given = simulated.copy()
    fv.tl.velocity(given, state_rank=False, n_steps=10, shared_clock=False)
    projected = simulated.copy()
    fv.tl.velocity(projected, state_rank=5, n_steps=10, shared_clock=False)
    assert "state_rank" not in given.uns["velocity_params"] and projected.uns["velocity_params"]["state_rank"] == 5
    for column in ("fit_beta", "fit_gamma", "fit_scaling_u", "fit_scaling_s"):  # the same fit
        np.testing.assert_array_equal(given.var[column], projected.var[column])
    var = projected.var
    gamma = (var["fit_gamma_read"] * var["fit_scaling_u"] / (var["fit_beta"] * var["fit_scaling_s"])).to_numpy()
    fitted = np.isfinite(gamma)
    blocks = np.stack([(simulated.layers["Mu"][:, fitted] / var["fit_scaling_u"].to_numpy()[fitted]).T,
                       (simulated.layers["Ms"][:, fitted] / var["fit_scaling_s"].to_numpy()[fitted]).T], -1)  # fmt: skip
    states = _exact_projection(blocks.astype(np.float32), 5)
    u = states[..., 0].T * var["fit_scaling_u"].to_numpy()[fitted]
    s = states[..., 1].T * var["fit_scaling_s"].to_numpy()[fitted]
    want = u - gamma[fitted] * s
    got = projected.layers["velocity"][:, fitted]
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
    assert not np.allclose(got, given.layers["velocity"][:, fitted], atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("n_genes", [12, 40])
def test_auto_reads_at_20_axes_or_at_half_the_fitted_genes_where_fewer(simulated, n_genes):
    adata = simulated[:, :n_genes].copy()
    auto = fv.tl.velocity(adata, n_steps=5, copy=True)
    fitted = int(np.isfinite(auto.var["fit_beta"]).sum())
    rank = min(20, math.ceil(fitted / 2))
    assert fitted > 10 and auto.uns["velocity_params"]["state_rank"] == rank
    explicit = fv.tl.velocity(adata, n_steps=5, state_rank=rank, copy=True)
    np.testing.assert_array_equal(auto.layers["velocity"], explicit.layers["velocity"])


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "all"])
def test_a_bad_state_rank_is_refused_and_nothing_is_written(simulated, rank):
    adata = simulated.copy()
    with pytest.raises(ValueError, match="state_rank"):
        fv.tl.velocity(adata, state_rank=rank, n_steps=2)
    assert "velocity" not in adata.layers
