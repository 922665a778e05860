"""Training losses: Flux Matching through the project's estimator core, DSM, and their noise-annealed forms.

A model ``model(x, sigma)`` acts on samples ``[N, *shape]``. For the core, one batch of one block is laid out
as ``x.reshape(1, B, D)`` and the model is wrapped as a block field ``[1, N, D] -> [1, N, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..flux import flux_matching_loss
from ._data import log_uniform
from ._models import sigma_vector
from ._proposal import LossNormaliser, TimeProposal


class BlockField:
    """``model(., sigma)`` as a field on one block ``[1, N, D]``."""

    def __init__(self, model, sigma: float, shape: tuple[int, ...]):
        self.model, self.sigma, self.shape = model, sigma, tuple(shape)

    def __call__(self, z: Tensor) -> Tensor:
        n = z.shape[1]
        return self.model(z[0].reshape(n, *self.shape), self.sigma).reshape(1, n, -1)


@dataclass
class FluxTerms:
    """Result of :func:`flux_loss`.

    Attributes
    ----------
    loss
        The core's Flux Matching loss (scalar, differentiable in the model's parameters).
    target
        ``g_hat`` at the anchors, ``[B, D]`` (detached).
    t
        The rollout time used.
    """

    loss: Tensor
    target: Tensor
    t: float


def flux_loss(
    model,
    x: Tensor,
    *,
    sigma: float,
    horizon: float = 4.0,
    n_substeps: int = 4,
    t: float | None = None,
    proposal_density: float | None = None,
    divergence: str = "auto",
    generator: torch.Generator | None = None,
) -> FluxTerms:
    """Flux Matching loss of ``model(., sigma)`` on a batch ``x`` ``[B, *shape]``.

    The loss is :func:`fluxvelo.flux.flux_matching_loss` on the batch laid out as one block ``[1, B, D]``.

    The core also returns the per-sample target ``g_hat``, which the loss normaliser and the time proposal use.

    Returns
    -------
    :class:`FluxTerms`.
    """
    b = x.shape[0]
    block = BlockField(model, float(sigma), x.shape[1:])
    out = flux_matching_loss(
        block,
        x.reshape(1, b, -1),
        sigma2=float(sigma) ** 2,
        horizon=horizon,
        n_substeps=n_substeps,
        t=t,
        proposal_density=proposal_density,
        divergence=divergence,
        generator=generator,
    )
    return FluxTerms(loss=out.loss, target=out.target[0], t=out.t)


def dsm_loss(model, x: Tensor, *, sigma: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching with the ``sigma^2`` weighting (Vincent, 2011; Song & Ermon, 2019).

    ``mean_i sigma_i^2 | f(x_i + sigma_i eps_i, sigma_i) + eps_i / sigma_i |^2``; ``sigma`` is a float or ``[B]``.
    """
    s = sigma_vector(sigma, x)
    sb = s.reshape(-1, *([1] * (x.ndim - 1)))
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    f = model(x + sb * eps, s)
    return (sb * f + eps).square().flatten(1).sum(1).mean()


@dataclass
class LossTerms:
    """All terms of one training step's loss.

    Attributes
    ----------
    total
        Sum to minimise (field, normaliser, proposal and regulariser terms).
    field
        The field's (normalised) loss.
    sigmas, times
        Noise levels and rollout times used (``times`` empty for DSM).
    extra
        Detached scalars for logging.
    """

    total: Tensor
    field: Tensor
    sigmas: Tensor
    times: Tensor
    extra: dict = field(default_factory=dict)


def annealed_flux_loss(
    model,
    x: Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    n_levels: int = 4,
    normaliser: LossNormaliser | None = None,
    proposal: TimeProposal | None = None,
    horizon: float = 4.0,
    n_substeps: int = 4,
    divergence: str = "auto",
    generator: torch.Generator | None = None,
) -> LossTerms:
    """Noise-annealed Flux Matching: ``n_levels`` log-uniform sigmas per step, one batch group per sigma.

    Each group calls the core once. The raw loss's gradient grows like ``sigma^-4`` as sigma shrinks (measured:
    about 10 orders of magnitude between sigma = 0.02 and 5), so group k's loss is first weighted by
    ``sigma_k^4`` (the weighting of the reference velocity code), which leaves gradients of order one at every
    level. A ``normaliser`` then divides the weighted loss by ``exp(u(sigma_k) / 2)``, where ``exp(u)`` learns
    the mean of ``|sigma^4 g_hat|^2 / (sigma^2 D)``: the squared size of the gradient with respect to the
    networks' raw output ``sigma f``. With a ``proposal``, each group's rollout time comes from it and its
    REINFORCE loss is added, with cost the normalised squared target.

    Returns
    -------
    :class:`LossTerms`.
    """
    b, d = x.shape[0], x[0].numel()
    if b < 2 * n_levels:
        raise ValueError(f"batch of {b} is too small for {n_levels} noise levels; use at least 2 samples per level.")
    sigmas = log_uniform(n_levels, sigma_min, sigma_max, generator, device=x.device).cpu()
    times, q_t = (proposal.sample(sigmas, generator) if proposal is not None else (None, None))
    losses, stats, used_t = [], [], []
    for k, xk in enumerate(x.tensor_split(n_levels)):
        s = float(sigmas[k])
        kw = {} if times is None else {"t": float(times[k]), "proposal_density": float(q_t[k])}
        terms = flux_loss(
            model, xk, sigma=s, horizon=horizon, n_substeps=n_substeps, divergence=divergence, generator=generator, **kw
        )
        weight = s**4
        losses.append(weight * terms.loss)
        used_t.append(terms.t)
        stats.append((weight * terms.target).square().sum(-1).mean() / (s**2 * d))
    losses = torch.stack(losses)
    used_t = torch.tensor(used_t)
    total_extra, extra = torch.zeros((), device=x.device), {}
    cost = torch.stack(stats) if stats else None
    if normaliser is not None and stats:
        u = normaliser(sigmas).to(x.device)
        field_loss = (losses / torch.exp(0.5 * u.detach())).sum()
        norm_loss = normaliser.objective(sigmas, cost)
        total_extra = total_extra + norm_loss
        extra["normaliser"] = float(norm_loss.detach())
        cost = cost / torch.exp(u.detach())
    else:
        field_loss = losses.sum()
    if proposal is not None and cost is not None:
        prop_loss = proposal.reinforce_loss(used_t, sigmas, cost)
        total_extra = total_extra + prop_loss.to(x.device)
        extra["proposal"] = float(prop_loss.detach())
        extra["mean_rate"] = float(proposal.rate(sigmas).mean().detach())
    return LossTerms(total=field_loss + total_extra, field=field_loss, sigmas=sigmas, times=used_t, extra=extra)


def annealed_dsm_loss(
    model, x: Tensor, *, sigma_min: float, sigma_max: float, generator: torch.Generator | None = None
) -> LossTerms:
    """DSM over log-uniform per-sample sigmas in ``[sigma_min, sigma_max]`` (``sigma^2`` weighting)."""
    sigmas = log_uniform(x.shape[0], sigma_min, sigma_max, generator, device=x.device)
    loss = dsm_loss(model, x, sigma=sigmas, generator=generator)
    return LossTerms(total=loss, field=loss, sigmas=sigmas.cpu(), times=torch.empty(0))


def flux_or_dsm(
    model,
    x: Tensor,
    *,
    objective: str,
    sigma: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    n_levels: int = 4,
    normaliser: LossNormaliser | None = None,
    proposal: TimeProposal | None = None,
    horizon: float = 4.0,
    n_substeps: int = 4,
    divergence: str = "auto",
    generator: torch.Generator | None = None,
) -> LossTerms:
    """One step's loss: ``objective`` ``'flux'`` or ``'dsm'``, at a single ``sigma`` or annealed over a range.

    A ``proposal`` also works at a single sigma (its REINFORCE baseline is then a running mean); the
    ``normaliser`` only acts across noise levels.
    """
    if objective not in {"flux", "dsm"}:
        raise ValueError(f"Unknown objective {objective!r}; use 'flux' or 'dsm'.")
    if sigma is not None:
        one = torch.tensor([float(sigma)])
        if objective == "dsm":
            loss = dsm_loss(model, x, sigma=sigma, generator=generator)
            return LossTerms(total=loss, field=loss, sigmas=one, times=torch.empty(0))
        kw, extra, total_extra = {}, {}, 0.0
        if proposal is not None:
            t, q = proposal.sample(one.to(x.device), generator)
            kw = {"t": float(t[0]), "proposal_density": float(q[0])}
        terms = flux_loss(
            model, x, sigma=sigma, horizon=horizon, n_substeps=n_substeps, divergence=divergence, generator=generator, **kw
        )
        if proposal is not None:
            cost = terms.target.square().sum(-1).mean().reshape(1)
            total_extra = proposal.reinforce_loss(torch.tensor([terms.t]), one, cost)
            extra["rate"] = float(proposal.rate(one).detach())
        return LossTerms(
            total=terms.loss + total_extra, field=terms.loss, sigmas=one, times=torch.tensor([terms.t]), extra=extra
        )
    if sigma_min is None or sigma_max is None or not 0 < sigma_min <= sigma_max:
        raise ValueError("Give sigma for a single noise level, or 0 < sigma_min <= sigma_max for annealing.")
    if objective == "dsm":
        return annealed_dsm_loss(model, x, sigma_min=sigma_min, sigma_max=sigma_max, generator=generator)
    return annealed_flux_loss(
        model,
        x,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        n_levels=n_levels,
        normaliser=normaliser,
        proposal=proposal,
        horizon=horizon,
        n_substeps=n_substeps,
        divergence=divergence,
        generator=generator,
    )

