"""fluxvelo.gen: losses against literal formulas, samplers on Gaussians, data, metrics, checkpoints, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import fluxvelo as fv
from fluxvelo import gen
from fluxvelo.flux import reference_loss



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared 2-core machine more threads spin and slow these small problems down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Affine(nn.Module):
    """``f(x, sigma) = W x + b`` (ignores sigma): enough for literal checks."""

    def __init__(self, d, seed=0):
        super().__init__()
        g = _gen(seed)
        self.w = nn.Parameter(0.3 * torch.randn(d, d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x, sigma):
        return x.flatten(1) @ self.w.T + self.b


# ---- losses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample_sigma", [False, True])
def test_dsm_matches_textbook_formula(per_sample_sigma):
    x = torch.randn(32, 3, generator=_gen(1), dtype=torch.float64)
    model = Affine(3)
    sigma = torch.linspace(0.1, 2.0, 32, dtype=torch.float64) if per_sample_sigma else 0.7
    got = gen.dsm_loss(model, x, sigma=sigma, generator=_gen(5))
    # Vincent (2011): E |f(x~) - grad log q(x~ | x)|^2, grad log q = -(x~ - x) / sigma^2, weighted by sigma^2
    eps = torch.randn(x.shape, generator=_gen(5), dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(32, 1)
    xt = x + s * eps
    target = -(xt - x) / s**2
    want = (s[:, 0] ** 2 * ((model(xt, None) - target) ** 2).sum(1)).mean()
    torch.testing.assert_close(got, want)


def test_flux_target_is_the_reference_pull_back():
    """The per-sample target read back from the core equals g_hat of the literal reference estimator.

    For a probe direction v, d/d(delta) of the reference loss of ``f + delta v`` is ``-2/B sum_i <v(z0_i), g_hat_i>``
    (g_hat is a constant); with v affine and random, this pins g_hat down.
    """
    d, b, sigma = 2, 24, 0.6
    x = torch.randn(b, d, generator=_gen(2), dtype=torch.float64)
    model = Affine(d, seed=3)
    terms = gen.flux_loss(model, x, sigma=sigma, generator=_gen(7))
    z0 = x + sigma * torch.randn(x.shape, generator=_gen(7), dtype=torch.float64)  # the first draw: anchor noise
    for seed in range(3):
        a = torch.randn(d, d, generator=_gen(100 + seed), dtype=torch.float64)
        c = torch.randn(d, generator=_gen(200 + seed), dtype=torch.float64)
        delta = torch.zeros((), dtype=torch.float64, requires_grad=True)
        probe = lambda z: model(z[0], sigma)[None] + delta * (z @ a.T + c)  # noqa: E731
        ref = reference_loss(probe, x[None], sigma2=sigma**2, generator=_gen(7), divergence="exact")
        (d_ref,) = torch.autograd.grad(ref, delta)
        ours = -2.0 / b * ((z0 @ a.T + c) * terms.target).sum()
        torch.testing.assert_close(d_ref, ours)
    torch.testing.assert_close(terms.loss, reference_loss(lambda z: model(z[0], sigma)[None], x[None], sigma2=sigma**2,
                                                          generator=_gen(7), divergence="exact"))


def test_annealed_flux_loss_is_the_weighted_sum_of_core_calls():
    x = torch.randn(16, 2, generator=_gen(0), dtype=torch.float64)
    model = Affine(2)
    terms = gen.annealed_flux_loss(model, x, sigma_min=0.1, sigma_max=2.0, n_levels=2, generator=_gen(4))
    # replay: the same generator draws the sigmas first, then each group's core call
    g = _gen(4)
    sigmas = gen._data.log_uniform(2, 0.1, 2.0, g)
    torch.testing.assert_close(terms.sigmas, sigmas)
    parts = [gen.flux_loss(model, xk, sigma=float(s), generator=g).loss for s, xk in zip(sigmas, x.tensor_split(2))]
    want = sum(float(s) ** 4 * p for s, p in zip(sigmas, parts))
    torch.testing.assert_close(terms.field, want)
    assert terms.sigmas.min() >= 0.1 and terms.sigmas.max() <= 2.0


def test_normaliser_learns_log_mean_of_its_statistic():
    norm = gen.LossNormaliser()
    opt = torch.optim.Adam(norm.parameters(), lr=0.05)
    sig = torch.tensor([0.1, 1.0, 5.0])
    mean_stat = torch.tensor([100.0, 1.0, 0.01])
    gen_ = _gen(0)
    for step in range(800):
        if step == 500:
            opt.param_groups[0]["lr"] = 0.005
        stat = mean_stat * (-torch.rand(3, generator=gen_).log())  # exponential draws with these means
        loss = norm.objective(sig, stat)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(norm(sig).detach(), mean_stat.log(), atol=0.35, rtol=0)


def test_proposal_density_is_normalised_and_samples_follow_it():
    prop = gen.TimeProposal(4.0, init_rate=1.5)
    sig = torch.tensor([0.3])
    grid = torch.linspace(0, 4, 4001)
    dens = prop.log_density(grid, sig.expand(1)).exp().detach()
    assert abs(float(torch.trapezoid(dens, grid)) - 1) < 1e-4
    # closed form: lam e^{-lam t} / (1 - e^{-lam H})
    lam = float(prop.rate(sig).detach())
    closed = [lam * math.exp(-lam * t) / (1 - math.exp(-4 * lam)) for t in range(5)]
    torch.testing.assert_close(dens[::1000], torch.tensor(closed))
    t, q = prop.sample(sig.expand(20000), _gen(0))
    assert 0 <= float(t.min()) and float(t.max()) <= 4
    want_mean = 1 / lam - 4 * math.exp(-4 * lam) / (1 - math.exp(-4 * lam))
    assert abs(float(t.mean()) - want_mean) < 0.03
    # rate 0 is the uniform law 1/H
    flat = gen.TimeProposal(4.0, init_rate=0.0)
    torch.testing.assert_close(flat.log_density(torch.tensor([0.5, 3.0]), sig).exp().detach(), torch.full((2,), 0.25))


@pytest.mark.parametrize(("cost_at_short", "direction"), [(True, 1.0), (False, -1.0)])
def test_reinforce_moves_the_proposal_towards_costly_times(cost_at_short, direction):
    """Minimising the variance E_q[|a|^2/q^2] moves q towards where |a| is large; here a = 1 on one half of [0, H]."""
    prop = gen.TimeProposal(4.0, init_rate=0.0)
    opt = torch.optim.SGD(prop.parameters(), lr=0.05)
    sig = torch.full((64,), 0.5)
    gen_ = _gen(1)
    rate0 = float(prop.rate(sig[:1]).detach())
    for _ in range(30):
        t, q = prop.sample(sig, gen_)
        a = ((t < 2) if cost_at_short else (t >= 2)).double()
        loss = prop.reinforce_loss(t, sig, (a / q) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert direction * (float(prop.rate(sig[:1]).detach()) - rate0) > 0.05


def test_mixing_regulariser_and_energy_distance():
    x = torch.randn(200, 2, generator=_gen(0))
    assert float(gen.energy_distance(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(gen.energy_distance(x, x + 1.0)) > float(gen.energy_distance(x, x + 0.3)) > 0
    # the exact score of N(0, I) smoothed at sigma pulls over-dispersed chains towards it: ratio below one
    model = Affine(2)
    with torch.no_grad():
        model.w.copy_(-torch.eye(2, dtype=torch.float64) / 1.25)
        model.b.zero_()
    reg = gen.mixing_regulariser(
        model, x.double(), sigma=0.5, n_steps=3, step_size=1.0, overdispersion=3.0, generator=_gen(1)
    )
    assert float(reg.detach()) < 0.5
    reg.backward()
    assert model.w.grad is not None and torch.isfinite(model.w.grad).all()


# ---- samplers -----------------------------------------------------------------------------------------


def _gaussian(d=2):
    m = torch.tensor([1.0, -2.0])[:d]
    s = torch.tensor([[1.0, 0.3], [0.3, 0.5]])[:d, :d]
    return m, s


def test_langevin_with_exact_score_reaches_the_gaussian():
    m, s = _gaussian()
    prec = torch.linalg.inv(s)
    score = lambda z, sigma: -(z - m) @ prec  # noqa: E731
    out = gen.langevin(score, 20000, shape=(2,), sigma=0.8, n_steps=400, step_size=0.05, init_std=2.0, device="cpu")
    torch.testing.assert_close(out.mean(0), m, atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), s, atol=0.05, rtol=0)
    again = gen.langevin(score, 20000, shape=(2,), sigma=0.8, n_steps=400, step_size=0.05, init_std=2.0, device="cpu")
    assert torch.equal(out, again)  # seeded
    chunked = gen.langevin(score, 20000, shape=(2,), sigma=0.8, n_steps=10, step_size=0.05, batch_size=5000, device="cpu")
    assert chunked.shape == (20000, 2)


@pytest.mark.parametrize("sampler", ["annealed", "pc"])
def test_annealed_samplers_with_exact_scores_reach_the_gaussian(sampler):
    m, s = _gaussian()

    def score(z, sigma):  # score of N(m, S + sigma^2 I)
        return -(z - m) @ torch.linalg.inv(s + sigma**2 * torch.eye(2))

    kw = {"steps_per_level": 20, "step_size": 0.1} if sampler == "annealed" else {"n_corrector": 1}
    fn = gen.annealed_langevin if sampler == "annealed" else gen.predictor_corrector
    out = fn(score, 20000, shape=(2,), sigma_min=0.01, sigma_max=10.0, n_levels=60, device="cpu", **kw)
    torch.testing.assert_close(out.mean(0), m, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), s, atol=0.06, rtol=0)


def test_sampler_rejects_unavailable_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        gen.langevin(lambda z, s: -z, 10, shape=(2,), sigma=1.0, n_steps=1, device="cuda")


# ---- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", gen._data.TOYS)
def test_toys_shapes_and_determinism(name):
    a, b = gen.toy_data(name, 500, random_state=3), gen.toy_data(name, 500, random_state=3)
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, gen.toy_data(name, 500, random_state=4))


def test_triangle_mixture_matches_its_definition():
    x = gen.triangle_mixture(30000, random_state=0).double()
    centres = torch.as_tensor(gen._data.triangle_centers(2.3))
    near = torch.cdist(x, centres).argmin(1)
    share = torch.bincount(near).double() / len(x)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.03, rtol=0)


def test_springs_shapes_energy_and_determinism():
    system = gen.Springs(damping=0.0)
    traj = gen.simulate_springs(64, system=system, random_state=0)
    assert traj.shape == (64, 50, 4)
    assert torch.equal(traj, gen.simulate_springs(64, system=system, random_state=0))
    e = system.energy(traj.double().numpy())
    drift = np.abs(e - e[:, :1]).max(1) / e[:, 0]
    assert drift.max() < 1e-3  # RK4 conserves energy closely without damping
    damped = gen.Springs()
    e2 = damped.energy(gen.simulate_springs(64, random_state=0).double().numpy())
    assert (e2[:, -1] < e2[:, 0]).all()  # damping dissipates
    # the first step follows Newton's law: q(dt) = q + dt v + dt^2 / 2 a + O(dt^3), with a from the forces
    s0 = traj[:, 0].double().numpy()
    q1, v1, q2 = s0[:, 0], s0[:, 1], s0[:, 2]
    a1 = -(q1) - 0.7 * (q1 - q2) - 0.0 * v1 - 0.08 * q1**3
    np.testing.assert_allclose(traj[:, 1, 0].double().numpy(), q1 + 0.1 * v1 + 0.005 * a1, atol=0.02)


def test_digits_and_dataset_split():
    x, y = gen.load_digits()
    assert x.shape == (1797, 1, 8, 8) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    train, held, st = gen.load_dataset("digits")
    assert len(train) + len(held) == 1797 and st is None
    tr, te, st = gen.load_dataset("springs", n=64)
    torch.testing.assert_close(st.inverse(tr).mean((0, 1)), st.mean)
    torch.testing.assert_close(tr.mean((0, 1)), torch.zeros(4), atol=1e-5, rtol=0)


def test_image_sets_fail_clearly_without_torchvision_or_files(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torchvision"):
            gen.load_images("mnist", tmp_path)
    else:
        with pytest.raises(FileNotFoundError, match="never downloads"):
            gen.load_images("mnist", tmp_path)


# ---- models -------------------------------------------------------------------------------------------


def test_models_shapes_and_causal_mask():
    x = torch.randn(3, 1, 8, 8, generator=_gen(0))
    assert gen.UNetField(1, width=8).forward(x, 0.5).shape == x.shape
    tr = gen.seeded_init(gen.TrajectoryTransformer(10, 4, hidden=16, heads=2, causal=True), _gen(0))
    z = torch.randn(2, 10, 4, generator=_gen(1), requires_grad=True)
    out = tr(z, 0.3)
    (grad,) = torch.autograd.grad(out[:, 4].sum(), z)
    assert grad[:, 5:].abs().max() == 0 and grad[:, :5].abs().max() > 0  # step 4 sees only steps <= 4


def test_rotational_field_is_score_plus_divergence_free_part():
    """For q = N(0, I): f = (I + omega A) grad log q, and div(q A grad log q) = 0 (a divergence-free flux)."""
    model = gen.RotationalField(2, omega=2.0)
    z = torch.randn(5, 2, generator=_gen(0), requires_grad=True)
    f = model(z, 0.5)
    g = model.gradient_part(z, 0.5)
    a = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    torch.testing.assert_close(f, g + 2.0 * g @ a.T)
    # the conservative part has a symmetric Jacobian
    jac = torch.stack([torch.autograd.grad(g[:, k].sum(), z, retain_graph=True)[0] for k in range(2)], 1)
    torch.testing.assert_close(jac, jac.transpose(1, 2), atol=1e-5, rtol=1e-4)


# ---- metrics ------------------------------------------------------------------------------------------


def test_sw_and_mmd_zero_for_identical_sets_and_grow_with_shift():
    x = torch.randn(500, 2, generator=_gen(0))
    assert gen.sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    assert gen.mmd(x, x) == pytest.approx(0.0, abs=1e-6)
    sw = [gen.sliced_wasserstein(x, x + torch.tensor([s, 0.0])) for s in (0.2, 0.5, 1.0)]
    md = [gen.mmd(x + torch.tensor([s, 0.0]), x) for s in (0.2, 0.5, 1.0)]
    assert 0 < sw[0] < sw[1] < sw[2] and 0 < md[0] < md[1] < md[2]
    # a shift by s along e1: W2 of each 1-D projection is |s cos|, so SW_2 = s / sqrt(2) in 2-D
    assert sw[2] == pytest.approx(1 / math.sqrt(2), rel=0.1)
    assert gen.sliced_wasserstein(x, x[:250] + 1.0) > 0  # unequal sizes


def test_exact_wasserstein_against_a_known_transport():
    x = torch.randn(200, 3, generator=_gen(0))
    perm = torch.randperm(200, generator=_gen(1))
    assert gen.wasserstein(x, x[perm]) == pytest.approx(0.0, abs=1e-9)
    assert gen.wasserstein(x, x + torch.tensor([0.5, 0.0, 0.0])) == pytest.approx(0.5, rel=1e-6)  # translation is optimal


def test_classifier_frechet_distance_and_recognisability():
    x, y = gen.load_digits()
    clf = gen.train_digit_classifier(x[:1400], y[:1400], n_steps=200)
    acc = float((clf(x[1400:]).argmax(1) == y[1400:]).double().mean())
    assert acc > 0.9
    same = gen.classifier_frechet_distance(x[:700], x[:700], clf)
    near = gen.classifier_frechet_distance(x[:700], x[700:1400], clf)
    noise = gen.classifier_frechet_distance(torch.rand(700, 1, 8, 8, generator=_gen(0)) * 2 - 1, x[700:1400], clf)
    assert abs(same) < 1e-6 and 0 < near < noise
    r = gen.recognisability(x[1400:], clf)
    assert r["confident_fraction"] > 0.8 and r["class_entropy"] > 2.2


def test_stationarity_test_separates_right_and_wrong_fields():
    data = torch.randn(800, 2, generator=_gen(0))
    sigma = 0.5
    right = lambda z, s: -z / (1 + s**2)  # noqa: E731  the score of N(0, I) smoothed at s
    wrong = lambda z, s: -z / (1 + s**2) + 1.5  # noqa: E731  a drift that moves the law
    kw = {"sigma": sigma, "total_time": 8.0, "step_size": 0.1, "n_checkpoints": 4, "noise_std": 3.0, "device": "cpu"}
    ok, bad = gen.stationarity_test(right, data, **kw), gen.stationarity_test(wrong, data, **kw)
    assert len(ok["times"]) == 5 and ok["times"][-1] == pytest.approx(8.0)
    assert max(ok["from_data"]) < 3 * ok["floor"] and ok["from_noise"][-1] < 3 * ok["floor"]
    assert bad["from_data"][-1] > 4 * bad["floor"]


# ---- training -----------------------------------------------------------------------------------------


def _tiny_trainer(objective="flux", **over):
    x = gen.triangle_mixture(256, random_state=0)
    model = gen.seeded_init(gen.MLPField(2, hidden=16, depth=2), _gen(0))
    cfg = dict(objective=objective, sigma_min=0.1, sigma_max=2.0, n_levels=2, normaliser=True, proposal=True,
               batch_size=32, n_steps=6, lr=1e-2, ema_decay=0.9, mixing_weight=0.1, lr_schedule="cosine")
    cfg.update(over)
    return gen.Trainer(model, x, gen.TrainConfig(**cfg), device="cpu")


def test_checkpoint_resume_continues_identically(tmp_path):
    fv.settings.progress_bar = False
    straight = _tiny_trainer().fit(6)
    first = _tiny_trainer().fit(3, checkpoint=tmp_path / "ck.pt")
    resumed = gen.Trainer.resume(tmp_path / "ck.pt", gen.MLPField(2, hidden=16, depth=2), first.data, device="cpu")
    assert resumed.step == 3
    resumed.fit(6)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.model.parameters(), resumed.ema.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.proposal.parameters(), resumed.proposal.parameters()):
        assert torch.equal(a, b)
    assert straight.history["loss"] == resumed.history["loss"]


def test_training_learns_the_score_and_ema_lags():
    """DSM on N(0, I) data at sigma = 0.5 learns the smoothed score -z / (1 + sigma^2)."""
    fv.settings.progress_bar = False
    data = torch.randn(1024, 2, generator=_gen(0))
    model = gen.seeded_init(gen.MLPField(2, hidden=32, depth=2), _gen(0))
    cfg = gen.TrainConfig(objective="dsm", sigma=0.5, batch_size=256, n_steps=300, lr=1e-2, ema_decay=0.9)
    tr = gen.Trainer(model, data, cfg, device="cpu")
    z = torch.randn(500, 2, generator=_gen(1))
    exact = -z / 1.25

    def err(m):
        with torch.no_grad():
            return float(((m(z, 0.5) - exact) ** 2).sum(1).mean() / (exact**2).sum(1).mean())

    before = err(tr.model)
    tr.fit()
    assert err(tr.ema.model) < 0.05 < before
    diff = sum(float((a - b).abs().sum().detach()) for a, b in zip(tr.model.parameters(), tr.ema.model.parameters()))
    assert diff > 0


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_round_trip(tmp_path):
    from fluxvelo.gen._cli import main

    out = tmp_path / "run"
    argv = ["train", "--data", "triangle", "--sigma", "0.45", "--steps", "4", "--n-train", "200", "--hidden", "16",
            "--batch-size", "64", "--out", str(out), "--n-samples", "100", "--sampler-steps", "5", "--device", "cpu"]
    fv.settings.progress_bar = False
    assert main(argv) == 0
    for name in ("checkpoint.pt", "config.json", "metrics.json", "samples.npy", "samples.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["sliced_wasserstein"] > 0
    assert main(argv[:-2] + ["--steps", "6", "--resume", "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s"), "--n-samples", "50",
                 "--sampler-steps", "3", "--device", "cpu"]) == 0
    assert np.load(tmp_path / "s" / "samples.npy").shape == (50, 2)


def test_cli_parser_registers_under_a_top_level_parser():
    import argparse

    from fluxvelo.gen._cli import add_gen_parser, main_gen

    top = argparse.ArgumentParser(prog="fluxvelo")
    add_gen_parser(top.add_subparsers(dest="command"))
    args = top.parse_args(["gen", "sample", "--checkpoint", "c.pt", "--out", "o"])
    assert args.func is main_gen and args.gen_command == "sample"
