"""Learned helpers of the noise-annealed loss: a per-sigma loss normaliser and a proposal over rollout time."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _LogSigmaNet(nn.Module):
    """A scalar function of ``log sigma``: Fourier features and one hidden layer, output initialised to 0."""

    def __init__(self, hidden: int = 64, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-1, math.log10(4.0), n_freq) * math.pi, persistent=False)
        self.net = nn.Sequential(nn.Linear(2 * n_freq + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, sigma: Tensor) -> Tensor:
        a = torch.log(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)).unsqueeze(-1) / 4
        a = a.to(self.freqs.device)
        feats = torch.cat([a, torch.sin(a * self.freqs), torch.cos(a * self.freqs)], -1)
        return self.net(feats).squeeze(-1)


class LossNormaliser(nn.Module):
    """Learned per-sigma scale ``u(sigma)`` with ``exp(u)`` tracking the mean of a positive statistic.

    Its own objective, ``stat / exp(u) + u``, is minimised at ``u = log E[stat | sigma]``. The trainer divides
    the field's loss at sigma by ``sqrt(exp(u))`` (detached), so every noise level contributes gradients of
    comparable size (for Flux Matching the statistic is the squared size of the regression target).
    """

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = _LogSigmaNet(hidden)

    def forward(self, sigma: Tensor) -> Tensor:
        """``u(sigma)``, ``[K]``."""
        return self.net(sigma)

    def objective(self, sigma: Tensor, stat: Tensor) -> Tensor:
        """``mean(stat / exp(u) + u)``; gradients reach the normaliser only."""
        u = self(sigma)
        return (stat.detach().to(u) / torch.exp(u) + u).mean()


def _phi(a: Tensor) -> Tensor:
    """``a / (1 - exp(-a))``, which tends to 1 at ``a = 0``, for any real a."""
    small = a.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(a), a)
    return torch.where(small, 1 + a / 2, safe / -torch.expm1(-safe))


class TimeProposal(nn.Module):
    """A truncated exponential proposal over the rollout time on ``[0, H]`` whose rate depends on sigma.

    ``q(t) = lam exp(-lam t) / (1 - exp(-lam H))``; any real rate is allowed (negative rates favour long
    times, ``lam = 0`` is uniform). The rate is trained by REINFORCE (:meth:`reinforce_loss`) to lower the
    variance of the importance-weighted estimator.

    Parameters
    ----------
    horizon
        ``H``.
    init_rate
        Rate at initialisation, for every sigma (0 gives the reference's uniform proposal; the paper's image
        models keep rates of at least 1).
    max_rate
        Rates are squashed into ``(-max_rate, max_rate)``.
    """

    def __init__(self, horizon: float = 4.0, *, init_rate: float = 1.0, max_rate: float = 5.0, hidden: int = 64):
        super().__init__()
        if not abs(init_rate) < max_rate:
            raise ValueError(f"init_rate must lie in (-max_rate, max_rate) = ({-max_rate}, {max_rate}).")
        self.horizon, self.max_rate = horizon, max_rate
        self.net = _LogSigmaNet(hidden)
        with torch.no_grad():
            self.net.net[-1].bias.fill_(max_rate * math.atanh(init_rate / max_rate))
        self.register_buffer("running_cost", torch.tensor(float("nan")))

    def rate(self, sigma: Tensor) -> Tensor:
        """``lam(sigma)``, ``[K]``."""
        return self.max_rate * torch.tanh(self.net(sigma) / self.max_rate)

    def log_density(self, t: Tensor, sigma: Tensor) -> Tensor:
        """``log q(t | sigma)``, differentiable in the proposal's parameters."""
        lam = self.rate(sigma)
        t = torch.as_tensor(t, dtype=lam.dtype, device=lam.device).reshape(-1)
        return torch.log(_phi(lam * self.horizon)) - math.log(self.horizon) - lam * t

    @torch.no_grad()
    def sample(self, sigma: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Times ``t ~ q(. | sigma)`` by inversion and their densities ``q(t)``, each ``[K]``."""
        lam = self.rate(sigma)
        u = torch.rand(lam.shape, generator=generator, device=lam.device, dtype=lam.dtype)
        h = self.horizon
        small = (lam * h).abs() < 1e-4
        safe = torch.where(small, torch.ones_like(lam), lam)
        t = torch.where(small, u * h, -torch.log1p(u * torch.expm1(-safe * h)) / safe).clamp(0.0, h)
        return t, self.log_density(t, sigma).exp()

    def reinforce_loss(self, t: Tensor, sigma: Tensor, cost: Tensor) -> Tensor:
        """Surrogate whose gradient is an unbiased estimate of ``d/dphi E_q[cost_q(t)]`` (up to a positive scale).

        For an importance-weighted estimator ``a(t) / q(t)``, the second moment is
        ``E_q[|a/q|^2] = int |a|^2 / q dt`` and its gradient is ``-E_q[|a/q|^2 d log q]``. With
        ``cost = |a(t)/q(t)|^2`` observed at the drawn times, minimising ``-(cost - b) log q(t)`` lowers the
        variance. The baseline ``b`` is the leave-one-out mean over the K draws (K > 1) or, for one draw, a
        running mean of past costs; neither depends on the current t, so the gradient stays unbiased. The
        surrogate is divided by the running mean cost so that its scale does not depend on the cost's units.
        """
        cost = cost.detach().reshape(-1).float()
        k = cost.numel()
        with torch.no_grad():
            if torch.isnan(self.running_cost):
                self.running_cost.fill_(float(cost.mean()))
            scale = self.running_cost.clamp_min(1e-30).to(cost.device)
            baseline = (cost.sum() - cost) / (k - 1) if k > 1 else scale.expand(1)
            loss_weight = (cost - baseline) / scale
            self.running_cost.mul_(0.95).add_(0.05 * float(cost.mean()))
        log_q = self.log_density(t.detach(), sigma)
        return -(loss_weight.to(log_q) * log_q).mean()
