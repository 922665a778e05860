"""Samplers for a learned field ``model(x, sigma)``: Langevin, annealed Langevin, predictor-corrector.

Time is measured as in the Flux Matching rollout: at level sigma the dynamics is
``dX = sigma^2 f(X) dt + sqrt(2) sigma dW``, integrated with the exponential integrator

    z <- z + (1 - e^-h) sigma^2 f(z) + sigma sqrt(1 - e^-2h) xi,

which is exact when ``sigma^2 f(z) + z`` is constant (e.g. the score of any law smoothed at sigma, frozen).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._utils import make_generators, resolve_device

Model = Callable[[Tensor, float], Tensor]


def as_generator(random_state: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A torch generator on ``device``: the one given, or a new one seeded from ``random_state``."""
    if isinstance(random_state, torch.Generator):
        return random_state
    return make_generators(random_state, device)[1]


def _randn(shape, like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def langevin_step(model: Model, z: Tensor, sigma: float, h: float, generator: torch.Generator | None) -> Tensor:
    """One exponential-integrator Langevin step of size ``h`` at level ``sigma`` (differentiable in the model)."""
    drift = -math.expm1(-h) * sigma**2 * model(z, sigma)
    return z + drift + sigma * math.sqrt(-math.expm1(-2 * h)) * _randn(z.shape, z, generator)


def sigma_schedule(sigma_min: float, sigma_max: float, n_levels: int) -> Tensor:
    """Geometric noise levels from ``sigma_max`` down to ``sigma_min``, ``[n_levels]`` (float64)."""
    if n_levels == 1:
        return torch.tensor([sigma_min], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n_levels, dtype=torch.float64))


def _prepare(model, device):
    device = resolve_device(device)
    if isinstance(model, nn.Module):
        model.to(device)
    return device


def _batches(n: int, batch_size: int | None) -> list[int]:
    b = batch_size or n
    return [min(b, n - i) for i in range(0, n, b)]


@torch.no_grad()
def langevin(
    model: Model,
    n: int | None = None,
    *,
    sigma: float,
    n_steps: int,
    step_size: float = 0.1,
    shape: Sequence[int] | None = None,
    x0: Tensor | None = None,
    init_std: float = 1.0,
    batch_size: int | None = None,
    random_state: int | torch.Generator | None = 0,
    device: str | torch.device = "auto",
) -> Tensor:
    """Langevin dynamics of the field at a single level ``sigma``.

    Parameters
    ----------
    model
        ``model(x, sigma) -> f`` (moved to ``device`` when it is a module).
    n, shape
        Number of samples and per-sample shape, when starting from ``N(0, init_std^2 I)``.
    sigma
        Noise level of the field (and of the dynamics' stationary law).
    n_steps, step_size
        Number of steps and their size ``h`` in rollout time.
    x0
        Start here instead (``[n, *shape]``).
    batch_size
        Simulate this many chains at a time.
    random_state
        Seed or a :class:`torch.Generator`.
    device
        ``'auto'``, ``'cpu'``, ``'cuda'`` or a :class:`torch.device`.

    Returns
    -------
    Samples ``[n, *shape]`` on the CPU.
    """
    device = _prepare(model, device)
    gen = as_generator(random_state, device)
    if x0 is None:
        if n is None or shape is None:
            raise ValueError("Give either x0 or both n and shape.")
    out, start = [], 0
    total = n if x0 is None else x0.shape[0]
    for b in _batches(total, batch_size):
        if x0 is None:
            z = init_std * torch.randn((b, *shape), generator=gen, device=device)
        else:
            z = x0[start : start + b].to(device)
        start += b
        for _ in range(n_steps):
            z = langevin_step(model, z, sigma, step_size, gen)
        out.append(z.cpu())
    return torch.cat(out)


def _init_noise(b: int, shape, std: float, gen, device) -> Tensor:
    return std * torch.randn((b, *shape), generator=gen, device=device)


@torch.no_grad()
def annealed_langevin(
    model: Model,
    n: int,
    *,
    shape: Sequence[int],
    sigma_min: float = 0.01,
    sigma_max: float = 10.0,
    n_levels: int = 50,
    steps_per_level: int = 5,
    step_size: float = 0.5,
    sigma_data: float = 1.0,
    denoise: bool = True,
    batch_size: int | None = None,
    random_state: int | torch.Generator | None = 0,
    device: str | torch.device = "auto",
) -> Tensor:
    """Annealed Langevin dynamics: a few Langevin steps at each level of a geometric schedule.

    A constant ``step_size`` in rollout time is the usual ``epsilon_i proportional to sigma_i^2`` rule.
    Chains start from ``N(0, (sigma_max^2 + sigma_data^2) I)``; ``denoise`` ends with the Tweedie step
    ``z + sigma_min^2 f(z)``.

    Returns
    -------
    Samples ``[n, *shape]`` on the CPU.
    """
    device = _prepare(model, device)
    gen = as_generator(random_state, device)
    sigmas = sigma_schedule(sigma_min, sigma_max, n_levels).tolist()
    out = []
    for b in _batches(n, batch_size):
        z = _init_noise(b, shape, math.sqrt(sigma_max**2 + sigma_data**2), gen, device)
        for s in sigmas:
            for _ in range(steps_per_level):
                z = langevin_step(model, z, s, step_size, gen)
        if denoise:
            z = z + sigmas[-1] ** 2 * model(z, sigmas[-1])
        out.append(z.cpu())
    return torch.cat(out)


@torch.no_grad()
def predictor_corrector(
    model: Model,
    n: int,
    *,
    shape: Sequence[int],
    sigma_min: float = 0.01,
    sigma_max: float = 10.0,
    n_levels: int = 100,
    n_corrector: int = 1,
    corrector_step: float = 0.3,
    sigma_data: float = 1.0,
    denoise: bool = True,
    batch_size: int | None = None,
    random_state: int | torch.Generator | None = 0,
    device: str | torch.device = "auto",
) -> Tensor:
    """Predictor-corrector sampling of the variance-exploding diffusion (Song et al., 2021).

    Predictor: a reverse-diffusion step from ``sigma_i`` to ``sigma_{i+1}``,
    ``z <- z + (sigma_i^2 - sigma_{i+1}^2) f(z, sigma_i) + sqrt(sigma_i^2 - sigma_{i+1}^2) xi``.
    Corrector: ``n_corrector`` Langevin steps at ``sigma_{i+1}``.

    Returns
    -------
    Samples ``[n, *shape]`` on the CPU.
    """
    device = _prepare(model, device)
    gen = as_generator(random_state, device)
    sigmas = sigma_schedule(sigma_min, sigma_max, n_levels).tolist()
    out = []
    for b in _batches(n, batch_size):
        z = _init_noise(b, shape, math.sqrt(sigma_max**2 + sigma_data**2), gen, device)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            dv = s**2 - s_next**2
            z = z + dv * model(z, s) + math.sqrt(dv) * torch.randn(z.shape, generator=gen, device=device)
            for _ in range(n_corrector):
                z = langevin_step(model, z, s_next, corrector_step, gen)
        if denoise:
            z = z + sigmas[-1] ** 2 * model(z, sigmas[-1])
        out.append(z.cpu())
    return torch.cat(out)


SAMPLERS = {"langevin": langevin, "annealed": annealed_langevin, "pc": predictor_corrector}
