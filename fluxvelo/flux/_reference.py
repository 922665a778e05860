"""A slow, literal transcription of the reference Flux Matching estimator (FLUX_MATCHING.md, steps 1-7).

Everything goes through autograd: the score of the batch's Gaussian mixture, its Jacobian, the divergence
of ``u = f - s`` and the gradient of ``r``. Random draws come in the same order as in
:func:`~fluxvelo.flux.flux_matching_loss`: anchor noise, time, the rollout's noise, then the Hutchinson probe.
It exists to check the fast estimator (tests) and to time it against (benchmarks), not to train with.
"""

from __future__ import annotations

import math

import torch


def mixture_score(z: torch.Tensor, x: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Score of the mixture ``mean_b N(x_b, sigma2 I)`` per block, from its log-density by autograd."""
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        log_p = torch.logsumexp(-((zz.unsqueeze(2) - x.unsqueeze(1)) ** 2).sum(-1) / (2 * sigma2), dim=-1)
        (grad,) = torch.autograd.grad(log_p.sum(), zz, create_graph=z.requires_grad)
    return grad


def reference_loss(
    field,
    x: torch.Tensor,
    *,
    sigma2: float,
    horizon: float = 4.0,
    n_substeps: int = 4,
    generator: torch.Generator | None = None,
    divergence: str = "hutchinson",
    turnover: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference estimator's loss on one batch ``x: [G, B, d]``, written out step by step.

    ``divergence='hutchinson'`` probes ``div u`` once, as the paper's code does; ``'exact'`` takes every
    partial derivative, which makes it equal to :func:`~fluxvelo.flux.flux_matching_loss` on the same draws.
    ``turnover`` (``[B]`` or ``[G, B]``) adds population balance: step 5 targets ``grad (r - g_sigma)`` with
    ``g_sigma(z) = sum_j w_j(z) g_j``, the turnover averaged with the score's kernel weights.
    """
    sigma = math.sqrt(sigma2)
    randn = lambda shape: torch.randn(shape, generator=generator, dtype=x.dtype)  # noqa: E731
    # 2. anchors
    z0 = x + sigma * randn(x.shape)
    # 3. time
    t = float(torch.rand((), generator=generator)) * horizon
    q = 1.0 / horizon
    # 4. rollout
    h = t / n_substeps
    z = z0
    for _ in range(n_substeps):
        z = z + (1 - math.exp(-h)) * sigma2 * mixture_score(z, x, sigma2) + sigma * math.sqrt(1 - math.exp(-2 * h)) * randn(z.shape)
    zt = z.detach().requires_grad_(True)

    # 5. r at the endpoints and its gradient in z
    def r(zq):
        s = mixture_score(zq, x, sigma2)
        u = field(zq) - s
        if divergence == "exact":
            div = sum(
                torch.autograd.grad(u[..., k].sum(), zq, create_graph=True)[0][..., k] for k in range(zq.shape[-1])
            )
        else:
            probe = torch.randint(0, 2, zq.shape, generator=generator).to(zq.dtype) * 2 - 1
            div = (torch.autograd.grad((u * probe).sum(), zq, create_graph=True)[0] * probe).sum(-1)
        if turnover is None:
            return div + (u * s).sum(-1)
        weights = torch.softmax(-((zq.unsqueeze(2) - x.unsqueeze(1)) ** 2).sum(-1) / (2 * sigma2), dim=-1)
        g_sigma = (weights * turnover.reshape(-1, 1, x.shape[1])).sum(-1)
        return div + (u * s).sum(-1) - g_sigma

    (g,) = torch.autograd.grad(r(zt).sum(), zt)
    g = g.detach()
    # 6. pull back
    rho = math.exp(-t)
    s0 = mixture_score(z0, x, sigma2).detach()
    mu = z0 + (1 - rho) * sigma2 * s0
    v = max(sigma2 * (1 - rho**2), 1e-12)
    logits = -((mu.unsqueeze(2) - zt.detach().unsqueeze(1)) ** 2).sum(-1) / (2 * v)  # [G, i, j]
    weights = torch.softmax(logits, dim=1)  # normalised over anchors i for each endpoint j
    g_hat = (rho / q) * torch.einsum("gij,gjd->gid", weights, g)
    # 7. loss
    return -2 * ((field(z0) - s0) * g_hat).sum(-1).sum(0).mean()
