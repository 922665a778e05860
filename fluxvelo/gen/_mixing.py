"""The fast-mixing regulariser: a few differentiable Langevin steps should bring a start law close to p_sigma.

Flux Matching leaves a whole family of fields with the data law stationary; this term picks, among them, one
whose dynamics reach the law quickly from a given start (noise, or the data over-dispersed to a higher noise
level, as in annealed sampling). It compares the chains after ``n_steps`` with fresh draws from ``p_sigma`` by
the energy distance, relative to the distance at the start.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._sampling import langevin_step


def energy_distance(x: Tensor, y: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two samples (V-statistics, >= 0).

    Distances are ``sqrt(d^2 + eps)`` so that the gradient stays finite on the diagonal.
    """
    x, y = x.flatten(1), y.flatten(1)

    def mean_dist(a, b):
        return (torch.cdist(a, b).square() + eps).sqrt().mean()

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def mixing_regulariser(
    model,
    x: Tensor,
    *,
    sigma: float,
    n_steps: int = 2,
    step_size: float = 0.5,
    start: Tensor | None = None,
    overdispersion: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Relative energy distance to ``p_sigma`` after ``n_steps`` Langevin steps of the field.

    Parameters
    ----------
    model
        ``model(x, sigma) -> f``.
    x
        A data batch ``[B, *shape]``; half gives the reference draws ``x + sigma eps`` from ``p_sigma``, the other
        half the start ``x + sqrt(1 + overdispersion^2) sigma eps'`` unless ``start`` is given.
    sigma
        Noise level.
    n_steps, step_size
        Langevin steps of size ``h`` (rollout time) to differentiate through.
    start
        Starting points ``[M, *shape]``, e.g. the sampler's initial noise.

    Returns
    -------
    ``D(after) / (D(start) + 1e-3)`` (scalar), differentiable in the model's parameters.
    """
    half = x.shape[0] // 2
    noise = lambda like: torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)  # noqa: E731
    y = x[:half] + sigma * noise(x[:half])
    if start is None:
        z = x[half:] + math.sqrt(1 + overdispersion**2) * sigma * noise(x[half:])
    else:
        z = start.to(x)
    with torch.no_grad():
        d0 = energy_distance(z, y)
    for _ in range(n_steps):
        z = langevin_step(model, z, sigma, step_size, generator)
    return energy_distance(z, y) / (d0 + 1e-3)
