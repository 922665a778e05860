"""One Flux Matching training step: steps 1-7 of the reference estimator, for any block layout.

The estimator's expectation is the paper's. Two changes lower its cost and variance and keep that
expectation: the score's derivatives are closed-form kernel moments (no autograd through the kernel),
and the field's divergence is exact when the field provides it or the blocks are small.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._kernel import kernel_mean_offset, pull_back, score_gradient_terms

Field = Callable[[Tensor], Tensor]

#: Floor of the pull-back variance ``sigma2 (1 - e^{-2t})``, as in the paper's code: ``t`` may be drawn as 0.
MIN_PULL_BACK_VARIANCE = 1e-12


@dataclass
class FluxLoss:
    """Result of :func:`flux_matching_loss`.

    Attributes
    ----------
    loss
        Scalar to minimise; gradients flow only through the field at the anchors.
    per_block
        The loss split over blocks, ``[G]`` (detached). Sums to ``loss``.
    t
        The rollout time used.
    target
        The pulled-back target ``g_hat`` at the anchors, ``[G, B, d]`` (detached): the loss is
        ``-2 mean_i <f(z0_i) - s(z0_i), g_hat_i>``. Learned proposals and loss normalisers use it.
    """

    loss: Tensor
    per_block: Tensor
    t: float
    target: Tensor


def _randn(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def field_divergence(field: Field, z: Tensor, f: Tensor, *, method: str, generator: torch.Generator | None) -> Tensor:
    """Divergence of ``field`` per block, ``[G, N]``, differentiable in ``z``.

    ``method`` is ``'exact'`` (one backward pass per block dimension; assumes each block's output depends only
    on its own block) or ``'hutchinson'`` (one Rademacher probe, unbiased).
    """
    closed_form = getattr(field, "divergence", None)
    if closed_form is not None and method == "exact":
        return closed_form(z)
    if method == "exact":
        parts = []
        for k in range(z.shape[-1]):
            (grad_k,) = torch.autograd.grad(f[..., k].sum(), z, create_graph=True)
            parts.append(grad_k[..., k])
        return torch.stack(parts, -1).sum(-1)
    if method == "hutchinson":
        probe = torch.randint(0, 2, z.shape, generator=generator, device=z.device).to(z.dtype) * 2 - 1
        (jtp,) = torch.autograd.grad((f * probe).sum(), z, create_graph=True)
        return (jtp * probe).sum(-1)
    raise ValueError(f"Unknown divergence method {method!r}; use 'exact' or 'hutchinson'.")


def flux_matching_loss(
    field: Field,
    x: Tensor,
    *,
    sigma2: float,
    horizon: float = 4.0,
    n_substeps: int = 4,
    t: float | None = None,
    proposal_density: float | None = None,
    divergence: str = "auto",
    loss_scale: float = 1.0,
    turnover: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FluxLoss:
    """The Flux Matching loss of ``field`` on one batch (FLUX_MATCHING.md, steps 1-7).

    With a ``turnover`` rate per sample the data are taken as stationary under drift, diffusion and births
    (``g > 0``) and losses (``g < 0``): ``-div(p f) + lap p + g p = 0``, population balance. The stationarity
    residual ``r = div u + u . s`` then has to match the kernel-smoothed turnover ``g_sigma``, and the
    endpoint target of step 5 becomes ``grad (r - g_sigma)``. Without it the model is the paper's.

    Parameters
    ----------
    field
        Callable mapping points ``[G, N, d]`` to the field ``[G, N, d]``. It may define ``divergence(z) -> [G, N]``.
    x
        The batch, laid out in blocks ``[G, B, d]``: G independent problems that share B samples.
    sigma2
        Noise level ``sigma^2`` of the smoothed data density.
    horizon
        ``H``: the rollout time is drawn from ``Uniform(0, H)`` unless ``t`` is given.
    n_substeps
        ``M``: exponential-integrator Langevin sub-steps of the rollout.
    t, proposal_density
        A rollout time and its proposal density ``q(t)``, for learned proposals. Default: ``t ~ U(0, H)``, ``q = 1/H``.
    divergence
        ``'exact'``, ``'hutchinson'`` or ``'auto'`` (exact when the field has a closed form or ``d <= 8``).
    loss_scale
        Constant factor on the loss (the reference velocity code uses ``sigma2**2``).
    turnover
        Turnover rate ``g`` of each sample, ``[B]`` (shared by all blocks) or ``[G, B]``, in the field's time
        unit. It should average to zero over the data (births balance losses). None: no turnover.
    generator
        Source of every random draw (noise, time, rollout, probes).

    Returns
    -------
    :class:`FluxLoss` with the loss, its split over blocks and the time used.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be laid out as [blocks, samples, dim]; got shape {tuple(x.shape)}.")
    if divergence == "auto":
        divergence = "exact" if hasattr(field, "divergence") or x.shape[-1] <= 8 else "hutchinson"
    sigma = math.sqrt(sigma2)
    with torch.no_grad():
        # Steps 2-4: anchors, time, rollout. The anchors' kernel mean serves the rollout, the pull-back and the loss.
        z0 = x + sigma * _randn(x.shape, x, generator)
        if t is None:
            t = float(torch.rand((), generator=generator, device=x.device)) * horizon
            proposal_density = 1.0 / horizon
        elif proposal_density is None:
            raise ValueError("Give proposal_density together with t.")
        h = t / n_substeps
        decay, spread = -math.expm1(-h), sigma * math.sqrt(-math.expm1(-2 * h))
        offset0 = kernel_mean_offset(z0, x, sigma2)
        z, offset = z0, offset0
        for k in range(n_substeps):
            if k:
                offset = kernel_mean_offset(z, x, sigma2)
            z = z + decay * offset + spread * _randn(z.shape, z, generator)
        zt = z

    # Step 5: g = grad_z r at the endpoints, a constant. The field's share comes from autograd in z only.
    with torch.enable_grad():
        zt = zt.detach().requires_grad_(True)
        f_t = field(zt)
        div_f = field_divergence(field, zt, f_t, method=divergence, generator=generator)
        with torch.no_grad():
            s_t, score_terms = score_gradient_terms(zt.detach(), x, sigma2, f_t.detach(), turnover)
        (field_terms,) = torch.autograd.grad(div_f.sum() + (f_t * s_t).sum(), zt)
    g = (field_terms + score_terms).detach()

    # Step 6: pull the target back to the anchors.
    rho = math.exp(-t)
    with torch.no_grad():
        mu = z0 + (1 - rho) * offset0
        # a time of (numerically) zero leaves no spread to pull back through; the paper's code floors it too
        spread2 = max(sigma2 * -math.expm1(-2 * t), MIN_PULL_BACK_VARIANCE)
        g_hat = (rho / proposal_density) * pull_back(mu, zt.detach(), spread2, g)
        s0 = offset0 / sigma2

    # Step 7: the loss; gradients flow only through the field at the anchors.
    inner = ((field(z0) - s0) * g_hat).sum(-1)  # [G, B]
    per_block = -2.0 * loss_scale * inner.mean(1)
    return FluxLoss(loss=per_block.sum(), per_block=per_block.detach(), t=t, target=g_hat)
