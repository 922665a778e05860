"""The fused CPU kernels against the torch kernels, which the other tests hold to autograd and the literal estimator."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

import fluxvelo as fv
from fluxvelo.fields import KineticField
from fluxvelo.flux import _kernel, _kernel_cpu, flux_matching_loss, kernel_mean_offset, pull_back, score_gradient_terms
from fluxvelo.flux._reference import reference_loss


def _both(fn):
    """``fn()`` with the fused kernels and with torch's."""
    fv.settings.fused_kernels = True
    fused = fn()
    fv.settings.fused_kernels = False
    try:
        plain = fn()
    finally:
        fv.settings.fused_kernels = True
    return fused, plain


@numba.njit(fastmath=True)
def _exps(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        out[i] = _kernel_cpu._exp(-a[i])
    return out


def test_exponential_is_accurate_to_float32_and_zero_below_the_cut():
    a = np.linspace(0, 200, 400_001, dtype=np.float32)
    t = _exps(a)
    kept = a < -_kernel_cpu.CUT_EXPONENT * np.log(2) - 0.5
    error = np.abs(t - np.exp(-a.astype(np.float64))) * np.exp(a.astype(np.float64))
    # float32 itself: the argument's rounding alone costs up to ~6e-8 * a relative
    assert np.max(error[a < 1]) < 2e-7
    assert np.max(error[kept] / a[kept].clip(1)) < 2e-7
    # below 2^CUT_EXPONENT: exactly 0, never a subnormal that would slow every product it enters
    cut = a > -_kernel_cpu.CUT_EXPONENT * np.log(2) + 0.5
    assert np.all(t[cut] == 0)
    assert np.all((t == 0) | (t >= np.finfo(np.float32).tiny))


@pytest.mark.parametrize(
    ("g", "n", "b", "d", "sigma2", "spread"),
    [
        (40, 64, 64, 2, 4.0, 30.0),
        (3, 50, 80, 2, 1e-3, 3.0),
        (1, 256, 200, 2, 0.05, 1.0),
        (1, 100, 70, 2, 0.5, 2.0),  # one block: its queries are cut into pieces, the last tile part-filled
        (7, 33, 5, 2, 0.5, 2.0),  # fewer samples than a tile's lanes
    ],
)
def test_fused_kernels_match_torch(g, n, b, d, sigma2, spread):
    gen = torch.Generator().manual_seed(0)
    x = spread * torch.rand(g, b, d, generator=gen)
    z = x[:, torch.randint(0, b, (n,), generator=gen)] + sigma2**0.5 * torch.randn(g, n, d, generator=gen)
    f, target = torch.randn(g, n, d, generator=gen), torch.randn(g, n, d, generator=gen)
    mu = x + 0.3 * sigma2**0.5 * torch.randn(g, b, d, generator=gen)
    turnover = torch.randn(g, b, generator=gen)

    def kernels():
        return (
            kernel_mean_offset(z, x, sigma2),
            *score_gradient_terms(z, x, sigma2, f),
            score_gradient_terms(z, x, sigma2, f, turnover)[1],
            pull_back(mu, z, 0.7 * sigma2, target),
        )

    fused, plain = _both(kernels)
    for a, c in zip(fused, plain):
        assert a.shape == c.shape
        assert (a - c).norm() / c.norm() < 2e-5


def test_fused_kernels_serve_float32_cpu_only(monkeypatch):
    _kernel._cpu_kernels()  # compiled first: a first compile warms the kernels up by calling them
    calls = []
    original = _kernel_cpu.mean_offset
    monkeypatch.setattr(_kernel_cpu, "mean_offset", lambda *args: calls.append(1) or original(*args))
    x = torch.rand(2, 10, 2)
    kernel_mean_offset(x, x, 0.1)
    assert calls == [1]
    kernel_mean_offset(x.double(), x.double(), 0.1)  # float64: torch, exact to the tests' tolerances
    fv.settings.fused_kernels = False
    try:
        kernel_mean_offset(x, x, 0.1)
    finally:
        fv.settings.fused_kernels = True
    kernel_mean_offset(torch.rand(1, 5, 12), torch.rand(1, 5, 12), 0.1)  # large blocks: matrix products
    kernel_mean_offset(torch.rand(3, 5, 3), torch.rand(3, 5, 3), 0.1)  # the fused loops are 2-D only
    assert calls == [1]


@pytest.fixture
def kernel_threads():
    """Lets a test set the fused kernels' thread count (torch's, which they follow), and restores it."""
    before = torch.get_num_threads()

    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n_blocks", "n_items"), [(40, 64), (3, 50), (1, 7), (5, 1), (1, 300), (2, 256)])
def test_tasks_tile_the_work_once(n_blocks, n_items, threads):
    cover = np.zeros((n_blocks, n_items), int)
    for g0, g1, n0, n1 in _kernel_cpu.tasks(n_blocks, n_items, threads):
        cover[g0:g1, n0:n1] += 1
    assert np.all(cover == 1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("g", [1, 9])
def test_kernels_give_the_same_result_on_any_number_of_threads(threads, g, monkeypatch, kernel_threads):
    """Each query's sums run in one fixed order whatever the rectangles, so results agree to the bit."""
    gen = torch.Generator().manual_seed(2)
    x, z = torch.rand(g, 40, 2, generator=gen), torch.rand(g, 33, 2, generator=gen)
    f, target = torch.randn(g, 33, 2, generator=gen), torch.randn(g, 40, 2, generator=gen)

    def kernels():
        return (kernel_mean_offset(z, x, 0.05), *score_gradient_terms(z, x, 0.05, f), pull_back(x, x, 0.05, target))

    monkeypatch.setattr(_kernel_cpu, "TASKS_PER_THREAD", 1)
    kernel_threads(1)
    alone = kernels()
    monkeypatch.setattr(_kernel_cpu, "TASKS_PER_THREAD", 5)  # up to 10 rectangles, 5 per block for g = 1
    kernel_threads(threads)
    for a, b in zip(kernels(), alone):
        assert torch.equal(a, b)


@pytest.mark.parametrize("turnover_shape", [None, (48,), (5, 48)])
@pytest.mark.parametrize("sigma2", [4.0, 1e-3])
def test_fused_step_equals_literal_estimator(sigma2, turnover_shape):
    """A whole float32 step with the fused kernels against the literal transcription on the same draws."""
    gen = torch.Generator().manual_seed(1)
    x = 1.0 + 0.5 * torch.randn(5, 48, 2, generator=gen)
    turnover = None if turnover_shape is None else torch.randn(turnover_shape, generator=gen)
    field = KineticField(5)
    with torch.no_grad():
        for p in field.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    for seed in range(3):
        fast = flux_matching_loss(field, x, sigma2=sigma2, generator=torch.Generator().manual_seed(seed), turnover=turnover)
        grads_fast = torch.autograd.grad(fast.loss, list(field.parameters()))
        gen = torch.Generator().manual_seed(seed)
        slow = reference_loss(field, x, sigma2=sigma2, generator=gen, divergence="exact", turnover=turnover)
        grads_slow = torch.autograd.grad(slow, list(field.parameters()))
        scale = slow.abs().item() + 1e-6
        assert abs(fast.loss.item() - slow.item()) / scale < 1e-3
        for a, c in zip(grads_fast, grads_slow):
            assert (a - c).norm() <= 1e-3 * c.norm() + 1e-6
