"""fv.tl.velocity: written keys, reproducibility, ground truth, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import fluxvelo as fv

_CACHE: dict = {}


def _sim():
    if "sim" not in _CACHE:
        a = fv.datasets.simulation(n_cells=300, n_genes=20, random_state=1)
        fv.pp.moments(a, n_neighbors=15, n_pcs=10)
        _CACHE["sim"] = a
    return _CACHE["sim"].copy()


@pytest.fixture
def sim():
    return _sim()


def _snapshot(adata):
    return (
        sorted(adata.layers.keys()),
        sorted(adata.var.columns),
        sorted(adata.uns.keys()),
        {k: adata.layers[k].copy() for k in ("Ms", "Mu")},
    )


def _assert_unchanged(adata, snap):
    layers, var, uns, data = snap
    assert sorted(adata.layers.keys()) == layers
    assert sorted(adata.var.columns) == var
    assert sorted(adata.uns.keys()) == uns
    for k, v in data.items():
        np.testing.assert_array_equal(adata.layers[k], v)


def test_writes_all_keys(sim):
    out = fv.tl.velocity(sim, epochs=1)
    assert out is None
    n_obs, n_vars = sim.shape
    for key in ("velocity", "velocity_u", "velocity_drive"):
        assert sim.layers[key].shape == (n_obs, n_vars) and sim.layers[key].dtype == np.float32
    for col in ("velocity_genes", "fit_beta", "fit_gamma", "fit_drive_a", "fit_drive_b", "fit_drive_c",
                "fit_scaling_u", "fit_scaling_s", "fit_loss"):
        assert col in sim.var
    params = sim.uns["velocity_params"]
    assert params["mode"] == "flux_matching" and params["version"] == fv.__version__
    assert params["device"] == "cpu" and params["epochs"] == 1 and params["preset"] == "default"
    assert "n_steps" not in params and params["steps_taken"] == 4  # 300 cells in batches of 64; unset: left out
    assert len(params["loss_history"]) == 1 and np.isfinite(params["loss_history"]).all()
    assert (sim.var["fit_beta"] > 0).all() and (sim.var["fit_gamma"] > 0).all()
    assert (sim.layers["velocity_drive"] > 0).all()


def test_velocity_is_the_fitted_kinetics(sim):
    """In splicing-time units, ds/dt = u - (gamma / beta) (s_u / s_s) s per gene, in original units (read at the
    smoothed states as given; tests/test_states.py reads it at projected ones)."""
    fv.tl.velocity(sim, epochs=1, state_rank=False, shared_clock=False)
    v = sim.var
    ratio = (v["fit_gamma_read"] / v["fit_beta"] * v["fit_scaling_u"] / v["fit_scaling_s"]).to_numpy()
    expected = sim.layers["Mu"] - ratio * sim.layers["Ms"]
    np.testing.assert_allclose(sim.layers["velocity"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # du/dt = drive - beta u, and beta in these units is the ratio of the two input scales
    decay = (v["fit_scaling_u"] / v["fit_scaling_s"]).to_numpy() * sim.layers["Mu"]
    np.testing.assert_allclose(sim.layers["velocity_u"], sim.layers["velocity_drive"] - decay, rtol=1e-4, atol=1e-4)


def test_shared_clock_rescales_each_gene_toward_one_pace(sim):
    """shared_clock=1 gives every fitted gene a spliced velocity that spreads over the cells as much as its spliced
    abundance; in between, each gene's velocity is its own clock's times (that spread ratio)^pooling."""
    own = fv.tl.velocity(sim, epochs=1, state_rank=False, shared_clock=False, copy=True)
    shared = fv.tl.velocity(sim, epochs=1, state_rank=False, shared_clock=1, copy=True)
    pooled = fv.tl.velocity(sim, epochs=1, state_rank=False, shared_clock=0.25, copy=True)
    fitted = np.isfinite(own.var["fit_beta"]).to_numpy()
    assert fitted.sum() > 5
    var = own.var[fitted]  # the splicing clock: ds/dt = u - gamma' s in original units
    splicing = (var["fit_scaling_u"] / (var["fit_beta"] * var["fit_scaling_s"])).to_numpy()
    np.testing.assert_allclose(var["fit_time_scale"].to_numpy(), splicing, rtol=1e-6)
    v_own, ms = own.layers["velocity"][:, fitted].astype(np.float64), sim.layers["Ms"][:, fitted].astype(np.float64)
    np.testing.assert_allclose(shared.layers["velocity"][:, fitted].std(0), ms.std(0), rtol=1e-3)
    factor = (ms.std(0) / v_own.std(0)) ** 0.25
    np.testing.assert_allclose(pooled.layers["velocity"][:, fitted], v_own * factor, rtol=1e-3, atol=1e-5)
    for key in ("velocity_u", "velocity_drive"):  # one time unit per gene for all three
        np.testing.assert_allclose(pooled.layers[key][:, fitted], own.layers[key][:, fitted] * factor, rtol=1e-3,
                                   atol=1e-5 * np.abs(own.layers[key]).max())  # fmt: skip
    assert pooled.uns["velocity_params"]["shared_clock"] == 0.25 and "shared_clock" not in own.uns["velocity_params"]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="shared_clock"):
            fv.tl.velocity(sim, shared_clock=bad)
    assert "velocity" not in sim.layers


def test_steady_state_ratio_pulls_each_genes_line_toward_the_steady_state(sim):
    """The velocities are read with a ratio gamma / beta that is the fitted one pulled, in log, toward scVelo's
    extreme-quantile ratio q (``Mu = q Ms`` on its steady-state line); the fit itself does not change."""
    kw = {"epochs": 1, "state_rank": False, "shared_clock": False, "copy": True}
    own = fv.tl.velocity(sim, steady_state_ratio=False, **kw)
    pulled = fv.tl.velocity(sim, steady_state_ratio=0.25, **kw)
    fitted = np.isfinite(own.var["fit_beta"]).to_numpy()
    np.testing.assert_array_equal(own.var["fit_gamma_read"], own.var["fit_gamma"])
    np.testing.assert_array_equal(pulled.var["fit_gamma"], own.var["fit_gamma"])
    var = pulled.var[fitted]
    unit = (var["fit_scaling_u"] / var["fit_scaling_s"]).to_numpy(np.float64)
    fit_ratio = (var["fit_gamma"] / var["fit_beta"]).to_numpy(np.float64) * unit
    read_ratio = (var["fit_gamma_read"] / var["fit_beta"]).to_numpy(np.float64) * unit
    q = fv.tl._steady_state.stochastic_velocity_genes(sim)["qreg_ratio"].to_numpy(np.float64)[fitted]
    usable = q > 0
    assert usable.sum() > 5
    np.testing.assert_allclose(read_ratio[usable], fit_ratio[usable] ** 0.75 * q[usable] ** 0.25, rtol=1e-5)
    np.testing.assert_allclose(read_ratio[~usable], fit_ratio[~usable], rtol=1e-6)
    expected = sim.layers["Mu"][:, fitted] - read_ratio * sim.layers["Ms"][:, fitted]
    np.testing.assert_allclose(pulled.layers["velocity"][:, fitted], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())  # fmt: skip
    # without scVelo's velocity genes the ratio comes from the smoothed layers alone: the same numbers
    by_fit = fv.tl.velocity(sim, steady_state_ratio=0.25, velocity_genes="fit", **kw)
    np.testing.assert_array_equal(by_fit.var["fit_gamma_read"], pulled.var["fit_gamma_read"])
    assert pulled.uns["velocity_params"]["steady_state_ratio"] == 0.25
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="steady_state_ratio"):
            fv.tl.velocity(sim, steady_state_ratio=bad)


def test_reading_with_the_pulled_ratio_leaves_the_fitted_field_as_fitted(sim, monkeypatch):
    from fluxvelo.tl import _velocity

    seen = []
    original = _velocity.read_field

    def read(model, *args, **kwargs):
        seen.append((model, model.gamma.detach().clone()))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(_velocity, "read_field", read)
    adata = fv.tl.velocity(sim, epochs=1, steady_state_ratio=0.25, copy=True)
    (model, gamma_before), = seen
    assert model.fixed_gamma is None
    torch.testing.assert_close(model.gamma.detach(), gamma_before, rtol=0, atol=0)
    assert not np.allclose(adata.var["fit_gamma_read"].dropna(), adata.var["fit_gamma"].dropna())


def test_same_seed_same_result_and_copy(sim):
    a = fv.tl.velocity(sim, epochs=1, random_state=3, copy=True)
    b = fv.tl.velocity(sim, epochs=1, random_state=3, copy=True)
    c = fv.tl.velocity(sim, epochs=1, random_state=4, copy=True)
    assert "velocity" not in sim.layers  # copy=True leaves the input alone
    np.testing.assert_array_equal(a.layers["velocity"], b.layers["velocity"])
    np.testing.assert_array_equal(a.uns["velocity_params"]["loss_history"], b.uns["velocity_params"]["loss_history"])
    assert not np.array_equal(a.layers["velocity"], c.layers["velocity"])


def test_recovers_ground_truth_direction(sim):
    """On the simulator, the fitted velocity points along the true one, and better than chance by far."""
    fv.tl.velocity(sim, epochs=3)
    est, truth = sim.layers["velocity"], sim.layers["true_velocity"]
    cos = (est * truth).sum(1) / (np.linalg.norm(est, axis=1) * np.linalg.norm(truth, axis=1))
    rng = np.random.default_rng(0)
    shuffled = est[rng.permutation(len(est))]
    cos_null = (shuffled * truth).sum(1) / (np.linalg.norm(shuffled, axis=1) * np.linalg.norm(truth, axis=1))
    assert cos.mean() > 0.35 and cos.mean() > cos_null.mean() + 0.2  # scVelo stochastic: 0.54 here


def test_h5ad_round_trip(sim, tmp_path):
    fv.tl.velocity(sim, epochs=1)
    path = tmp_path / "v.h5ad"
    sim.uns["true_edges"] = np.asarray(sim.uns["true_edges"], dtype=str)
    sim.write_h5ad(path)
    import anndata as ad

    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.layers["velocity"], sim.layers["velocity"])
    np.testing.assert_array_equal(back.uns["velocity_params"]["loss_history"], sim.uns["velocity_params"]["loss_history"])


def test_paper_preset_and_linear_field(sim):
    a = fv.tl.velocity(sim, preset="paper", epochs=1, copy=True)
    params = a.uns["velocity_params"]
    assert params["sigma2"] == 1e-3 and "gene_scale" not in params and params["time_unit"] == "diffusion"
    assert params["loss_scale"] == pytest.approx(1e-6)
    assert params["steps_taken"] == 2  # 300 cells: a batch of 256 and a last one of 44, as a DataLoader
    # the paper's pipeline projects square-rooted velocities (scVelo's rule for the stochastic fit it ran first)
    assert params["sqrt_transform"]
    assert not fv.tl.velocity(sim, epochs=1, copy=True).uns["velocity_params"]["sqrt_transform"]
    graphs = {}
    for option in (None, True, False):
        fv.tl.velocity_graph(a, sqrt_transform=option)
        graphs[option] = a.uns["velocity_graph"].toarray()
    np.testing.assert_array_equal(graphs[None], graphs[True])
    assert not np.allclose(graphs[None], graphs[False])
    b = fv.tl.velocity(sim, field="linear", epochs=1, copy=True)
    assert (b.var["fit_drive_a"] == 0).all() and (b.var["fit_drive_b"] == 0).all()


def test_key_added_keeps_fits_apart(sim):
    fv.tl.velocity(sim, epochs=1)
    fv.tl.velocity(sim, epochs=1, key_added="v2", random_state=5)
    assert "v2" in sim.layers and "v2_u" in sim.layers and "v2_genes" in sim.var and "v2_params" in sim.uns
    assert "v2_fit_beta" in sim.var and not np.array_equal(sim.var["v2_fit_beta"], sim.var["fit_beta"])


def test_zero_gene_is_not_fitted(sim):
    sim.layers["Ms"][:, 0] = 0
    fv.tl.velocity(sim, epochs=1)
    assert not sim.var["velocity_genes"].iloc[0]
    assert np.isnan(sim.layers["velocity"][:, 0]).all() and np.isnan(sim.var["fit_beta"].iloc[0])
    assert np.isfinite(sim.layers["velocity"][:, 1:]).all()


def test_sparse_and_integer_layers(sim):
    dense = fv.tl.velocity(sim, epochs=1, copy=True)
    sim.layers["Ms"] = sp.csr_matrix(sim.layers["Ms"])
    sparse = fv.tl.velocity(sim, epochs=1, copy=True)
    np.testing.assert_allclose(sparse.layers["velocity"], dense.layers["velocity"], rtol=1e-6)
    sim.layers["Mu"] = np.rint(sim.layers["Mu"]).astype(np.int64)
    fv.tl.velocity(sim, epochs=1)
    assert np.isfinite(sim.layers["velocity"]).any()


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: a.layers.pop("Ms"), KeyError, r"fluxvelo.pp.moments"),
        (lambda a: a.layers["Mu"].__setitem__((0, 0), np.nan), ValueError, "NaN"),
        (lambda a: a.layers["Mu"].__setitem__((0, 0), np.inf), ValueError, "NaN or infinite"),
        (lambda a: a.layers["Ms"].__setitem__((0, 0), -1.0), ValueError, "non-negative"),
    ],
)
def test_bad_input_leaves_adata_unchanged(sim, mutate, error, match):
    mutate(sim)
    snap = _snapshot(sim) if "Ms" in sim.layers else None
    with pytest.raises(error, match=match):
        fv.tl.velocity(sim, epochs=1)
    if snap is not None:
        _assert_unchanged(sim, snap)
    assert "velocity" not in sim.layers and "velocity_params" not in sim.uns


def test_bad_options(sim):
    snap = _snapshot(sim)
    with pytest.raises(ValueError, match="preset"):
        fv.tl.velocity(sim, preset="fast")
    with pytest.raises(ValueError, match="field"):
        fv.tl.velocity(sim, field="neural-ode")
    with pytest.raises(ValueError, match="positive"):
        fv.tl.velocity(sim, sigma2=0)
    with pytest.raises(ValueError, match="device"):
        fv.tl.velocity(sim, device="tpu")
    with pytest.raises(ValueError, match="Too few cells"):
        fv.tl.velocity(sim[:2].copy())
    with pytest.raises(KeyError, match="'unspliced_missing'"):
        fv.tl.velocity(sim, layer_unspliced="unspliced_missing")
    _assert_unchanged(sim, snap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_absent_is_a_clear_error(sim):
    with pytest.raises(RuntimeError, match="CUDA is not available.*device='cpu'"):
        fv.tl.velocity(sim, device="cuda")
    assert "velocity" not in sim.layers


@pytest.mark.gpu
def test_gpu_fit_matches_cpu_closely(sim):
    cpu = fv.tl.velocity(sim, epochs=1, device="cpu", copy=True)
    gpu = fv.tl.velocity(sim, epochs=1, device="cuda", copy=True)
    assert gpu.uns["velocity_params"]["device"].startswith("cuda")
    cos = (cpu.layers["velocity"] * gpu.layers["velocity"]).sum() / (
        np.linalg.norm(cpu.layers["velocity"]) * np.linalg.norm(gpu.layers["velocity"])
    )
    assert cos > 0.9  # different random streams on the two devices, same fit


def test_min_r2_selects_velocity_genes(sim):
    strict = fv.tl.velocity(sim, epochs=1, min_r2=0.5, copy=True)
    every = fv.tl.velocity(sim, epochs=1, min_r2=False, copy=True)
    assert every.var["velocity_genes"].all()
    assert strict.var["velocity_genes"].sum() < every.var["velocity_genes"].sum()
    np.testing.assert_array_equal(strict.layers["velocity"], every.layers["velocity"])  # selection only


def test_small_fits_leave_the_thread_count_as_it_was(sim, monkeypatch):
    from fluxvelo.tl import _fit

    seen = []
    original = _fit.flux_matching_loss

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(_fit, "flux_matching_loss", spy)
    before = torch.get_num_threads()
    fv.tl.velocity(sim, epochs=1)  # 20 genes x 64^2 kernel entries: below SINGLE_THREAD_WORK
    assert torch.get_num_threads() == before
    assert set(seen) == {1}


def test_the_field_is_read_on_the_fits_last_thread_count(sim, monkeypatch):
    """Reading the field after the fit keeps the fit's threads (one where other processes hold the cores), not all."""
    from fluxvelo.tl import _reading

    seen = []
    original = _reading.evaluate_field
    monkeypatch.setattr(_reading, "evaluate_field", lambda *a, **kw: seen.append(torch.get_num_threads()) or original(*a, **kw))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fv.tl.velocity(sim, epochs=1)  # small work: the fit runs on one thread
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cell_chunks_do_not_change_the_result(sim, monkeypatch):
    """Input layout, rate statistics and the final evaluation run in cell chunks; chunk size must not matter."""
    from fluxvelo.tl import _input

    whole = fv.tl.velocity(sim, n_steps=5, copy=True, velocity_genes="fit")  # 'fit': its line's R^2 runs in chunks too
    monkeypatch.setattr(_input, "CELL_CHUNK", 7)
    chunked = fv.tl.velocity(sim, n_steps=5, copy=True, velocity_genes="fit")
    for key in ("velocity", "velocity_u", "velocity_drive"):
        np.testing.assert_allclose(chunked.layers[key], whole.layers[key], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(chunked.var["velocity_genes"], whole.var["velocity_genes"])
    np.testing.assert_allclose(chunked.var["fit_scaling_u"], whole.var["fit_scaling_u"], rtol=1e-6)


def test_adam_steps_as_torch_does():
    """The fit's Adam against torch.optim.Adam on the same gradients, a parameter left without one at times."""
    from fluxvelo.tl._fit import Adam

    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    mine, reference = Adam(ours, lr=0.05), torch.optim.Adam(theirs, lr=0.05)
    for step in range(12):
        mine.zero_grad()
        reference.zero_grad(set_to_none=True)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if i == 1 and step % 3 == 2:
                continue
            grad = torch.randn(a.shape, generator=gen) * 10.0 ** (step % 4 - 2)
            a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_a_fit_does_not_import_torch_dynamo():
    """torch's optimisers import torch._dynamo (about 2 s in a fresh process); the fit needs none of it."""
    code = (
        "import sys, fluxvelo as fv\n"
        "fv.settings.progress_bar = False\n"
        "adata = fv.datasets.simulation(n_cells=200, n_genes=8, random_state=0)\n"
        "fv.pp.moments(adata, n_neighbors=10)\n"
        "fv.tl.velocity(adata, n_steps=3)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "False"
