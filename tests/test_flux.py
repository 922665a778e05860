"""The estimator core against autograd and a literal transcription of the reference estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fluxvelo.fields import KineticField
from fluxvelo.flux import flux_matching_loss, kernel_mean_offset, pull_back, score, score_gradient_terms
from fluxvelo.flux._reference import mixture_score, reference_loss



def _data(g, b, d, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    return spread * torch.randn(g, b, d, generator=gen, dtype=torch.float64)


class MLPField(nn.Module):
    """A small unrestricted field acting on one block of dimension d (not gene-local)."""

    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, d)).double()

    def forward(self, z):
        return self.net(z)


@pytest.mark.parametrize("d", [2, 12])
def test_score_matches_autograd(d):
    x = _data(3, 20, d)
    z = x + 0.1 * _data(3, 20, d, seed=1)
    torch.testing.assert_close(score(z, x, 0.05), mixture_score(z, x, 0.05))


@pytest.mark.parametrize("d", [2, 12])
def test_score_gradient_terms_match_autograd(d):
    sigma2 = 0.05
    x = _data(2, 15, d)
    z = (x + 0.2 * _data(2, 15, d, seed=2)).requires_grad_(True)
    f = _data(2, 15, d, seed=3)
    s = mixture_score(z, x, sigma2)
    v = (f - 2 * s).detach()
    jvp = torch.autograd.grad((s * v).sum(), z, retain_graph=True)[0]  # J_s symmetric: J_s^T v = J_s v
    div = sum(torch.autograd.grad(s[..., k].sum(), z, create_graph=True)[0][..., k] for k in range(d))
    grad_div = torch.autograd.grad(div.sum(), z)[0]
    s_fast, terms = score_gradient_terms(z.detach(), x, sigma2, f)
    torch.testing.assert_close(s_fast, s.detach())
    torch.testing.assert_close(terms, jvp - grad_div)


def test_small_sigma_float32_stays_accurate():
    """Unscaled abundances with sigma2 = 1e-3 (the reference setting) in float32 against float64."""
    x = 5 + 2 * _data(4, 64, 2)
    z = x + 0.03 * _data(4, 64, 2, seed=5)
    f = _data(4, 64, 2, seed=6)
    exact = score_gradient_terms(z, x, 1e-3, f)[1]
    approx = score_gradient_terms(z.float(), x.float(), 1e-3, f.float())[1].double()
    assert (approx - exact).norm() / exact.norm() < 1e-3


def test_pull_back_is_normalised_over_anchors():
    mu, zt = _data(2, 10, 2), _data(2, 10, 2, seed=1)
    ones = torch.ones(2, 10, 2, dtype=torch.float64)
    # each endpoint's weights sum to one over anchors, so pulling back ones spreads total mass 10 per block
    torch.testing.assert_close(pull_back(mu, zt, 0.3, ones).sum(1), torch.full((2, 2), 10.0, dtype=torch.float64))


def _kinetic(g, seed=0):
    field = KineticField(g, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in field.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return field


def _turnover(kind: str, g: int, b: int) -> torch.Tensor | None:
    """None, one rate per sample shared by the blocks ([B]), or one per block and sample ([G, B])."""
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(7)
    rates = torch.randn(g if kind == "per_block" else 1, b, generator=gen, dtype=torch.float64)
    rates = rates - rates.mean(-1, keepdim=True)
    return rates if kind == "per_block" else rates[0]


@pytest.mark.parametrize("turnover", ["none", "shared", "per_block"])
@pytest.mark.parametrize(
    ("make_field", "g", "d", "sigma2"),
    [
        (lambda: _kinetic(4), 4, 2, 0.01),
        (lambda: _kinetic(3, seed=1), 3, 2, 1e-3),
        (lambda: MLPField(3), 1, 3, 0.05),
        (lambda: MLPField(12), 1, 12, 0.1),
    ],
)
def test_fast_estimator_equals_literal_on_same_draws(make_field, g, d, sigma2, turnover):
    field = make_field()
    x = _data(g, 24, d, spread=0.5) + 1.0
    rates = _turnover(turnover, g, 24)
    for seed in range(3):
        fast = flux_matching_loss(
            field, x, sigma2=sigma2, generator=torch.Generator().manual_seed(seed), divergence="exact", turnover=rates
        )
        grads_fast = torch.autograd.grad(fast.loss, list(field.parameters()))
        slow = reference_loss(
            field, x, sigma2=sigma2, generator=torch.Generator().manual_seed(seed), divergence="exact", turnover=rates
        )
        grads_slow = torch.autograd.grad(slow, list(field.parameters()))
        torch.testing.assert_close(fast.loss, slow, rtol=1e-7, atol=1e-9)
        for a, b in zip(grads_fast, grads_slow):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(fast.per_block.sum(), fast.loss.detach())


def test_closed_form_divergence_equals_autograd():
    field = _kinetic(5)
    z = _data(5, 7, 2).requires_grad_(True)
    f = field(z)
    auto = sum(torch.autograd.grad(f[..., k].sum(), z, retain_graph=True)[0][..., k] for k in range(2))
    torch.testing.assert_close(field.divergence(z), auto)


def test_hutchinson_reference_has_the_same_expectation():
    """The reference probes div u once; averaged over many draws it agrees with the exact-divergence estimator."""
    field = MLPField(3)
    x = _data(1, 12, 3, spread=0.5)
    n = 400
    fast, slow = torch.zeros(()), torch.zeros(())
    fast_sq = torch.zeros(())
    for seed in range(n):
        a = flux_matching_loss(field, x, sigma2=0.1, generator=torch.Generator().manual_seed(seed)).loss.detach()
        b = reference_loss(field, x, sigma2=0.1, generator=torch.Generator().manual_seed(seed), divergence="hutchinson").detach()
        fast, slow, fast_sq = fast + a / n, slow + b / n, fast_sq + (a - b) ** 2 / n
    # same draws for anchors, time and rollout: the paired difference isolates the probe's noise
    stderr = math.sqrt(float(fast_sq) / n)
    assert abs(float(fast - slow)) < 4 * stderr + 1e-9


def test_score_field_has_zero_loss():
    """If the field is the smoothed density's own score, u = 0, so r = 0 and the loss and its target vanish."""
    x = _data(2, 16, 2)

    class ScoreField(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, z):
            return self.w * mixture_score(z, x, 0.05)

    out = flux_matching_loss(ScoreField(), x, sigma2=0.05, generator=torch.Generator().manual_seed(0))
    assert abs(float(out.loss.detach())) < 1e-6


def test_mean_offset_is_score_times_sigma2():
    x = _data(3, 9, 2)
    torch.testing.assert_close(kernel_mean_offset(x, x, 0.2), 0.2 * mixture_score(x, x, 0.2))


def test_turnover_changes_the_target_and_zero_turnover_does_not():
    field = _kinetic(3)
    x = _data(3, 24, 2, spread=0.5) + 1.0
    base = flux_matching_loss(field, x, sigma2=0.01, generator=torch.Generator().manual_seed(0)).loss
    zero = flux_matching_loss(
        field, x, sigma2=0.01, generator=torch.Generator().manual_seed(0), turnover=torch.zeros(24, dtype=x.dtype)
    ).loss
    some = flux_matching_loss(
        field, x, sigma2=0.01, generator=torch.Generator().manual_seed(0), turnover=_turnover("shared", 3, 24)
    ).loss
    torch.testing.assert_close(zero, base)
    assert abs(float(some.detach() - base.detach())) > 1e-6 * abs(float(base.detach()))


def test_turnover_of_the_wrong_shape_is_an_error():
    x = _data(3, 24, 2)
    with pytest.raises(ValueError, match="turnover"):
        flux_matching_loss(_kinetic(3), x, sigma2=0.01, turnover=torch.zeros(2, 24, dtype=x.dtype))


def test_time_zero_does_not_divide_by_zero():
    """t = 0 leaves the pull-back no spread; its variance is floored as in the paper's code."""
    field = _kinetic(2)
    x = _data(2, 16, 2, spread=0.5)
    out = flux_matching_loss(field, x, sigma2=0.01, t=0.0, proposal_density=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
