"""Gene-local splicing-kinetics fields: each gene is a 2-D block ``(u, s)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

EPS = 1e-6


class KineticField(nn.Module):
    """The paper's kinetic field, one 2-D block ``(u, s)`` per gene.

    .. math::
        \\mathrm{drive} = \\mathrm{softplus}(a u + b s + c) + 10^{-6},\\quad
        \\dot u = \\mathrm{drive} - \\beta u,\\quad \\dot s = \\beta u - \\gamma s,

    with ``beta = softplus(beta_raw) + 1e-6`` and ``gamma = softplus(gamma_raw) + 1e-6``. All five raw
    parameters per gene start at 0. Input and output are laid out ``[genes, cells, 2]``.

    Parameters
    ----------
    n_genes
        Number of genes (blocks).
    """

    block_dim = 2

    def __init__(self, n_genes: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.n_genes = n_genes
        for name in ("a", "b", "c", "beta_raw", "gamma_raw"):
            self.register_parameter(name, nn.Parameter(torch.zeros(n_genes, 1, dtype=dtype)))

    @property
    def beta(self) -> Tensor:
        return softplus(self.beta_raw) + EPS

    @property
    def gamma(self) -> Tensor:
        return softplus(self.gamma_raw) + EPS

    def _pre(self, u: Tensor, s: Tensor) -> Tensor:
        return self.a * u + self.b * s + self.c

    def drive(self, z: Tensor) -> Tensor:
        """Transcription drive ``[genes, cells]``, always positive."""
        return softplus(self._pre(z[..., 0], z[..., 1])) + EPS

    def forward(self, z: Tensor) -> Tensor:
        u, s = z[..., 0], z[..., 1]
        beta = self.beta
        drive = softplus(self._pre(u, s)) + EPS
        return torch.stack((drive - beta * u, beta * u - self.gamma * s), -1)

    def divergence(self, z: Tensor) -> Tensor:
        """Exact divergence ``a * sigmoid(a u + b s + c) - beta - gamma``, ``[genes, cells]``."""
        return self.a * torch.sigmoid(self._pre(z[..., 0], z[..., 1])) - self.beta - self.gamma

    def rates(self) -> dict[str, Tensor]:
        """Per-gene parameters in their natural units: drive coefficients a, b, c and rates beta, gamma."""
        return {
            "a": self.a.detach()[:, 0],
            "b": self.b.detach()[:, 0],
            "c": self.c.detach()[:, 0],
            "beta": self.beta.detach()[:, 0],
            "gamma": self.gamma.detach()[:, 0],
        }


class LinearKineticField(KineticField):
    """Steady-state linear kinetics: constant transcription ``softplus(c) + 1e-6`` per gene.

    The special case ``a = b = 0`` of :class:`KineticField`; ``a`` and ``b`` are fixed at zero.
    """

    def __init__(self, n_genes: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_genes, dtype=dtype)
        for name in ("a", "b"):
            self.get_parameter(name).requires_grad_(False)

    def parameters(self, recurse: bool = True):  # noqa: D102 - only the trainable ones
        return (p for p in super().parameters(recurse) if p.requires_grad)
