"""Gene-local splicing-kinetics fields: each gene is a 2-D block ``(u, s)``."""

from __future__ import annotations

import copy

import numpy as np
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
    parameters per gene start at 0 (the paper's form). :meth:`start_at`, :meth:`hold_balance` and
    :meth:`centre_drive` give the balanced fit its start, tie ``gamma`` to the spliced balance and centre the
    drive's inputs; none changes the family. Input and output are laid out ``[genes, cells, 2]``.

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
        self.register_buffer("balance", None)  # [genes, 3]: E[u], E[s], E[g s] when gamma is held to balance
        self.register_buffer("fixed_gamma", None)  # [genes, 1]: gamma held at given values (fix_gamma)
        self.register_buffer("drive_centre", None)  # [genes, 2]: where the drive's inputs are centred, if they are
        self.register_buffer("drive_unit", None)  # []: their unit, set with drive_centre

    @property
    def beta(self) -> Tensor:
        return softplus(self.beta_raw) + EPS

    @property
    def gamma(self) -> Tensor:
        if self.fixed_gamma is not None:
            return self.fixed_gamma
        if self.balance is None:
            return softplus(self.gamma_raw) + EPS
        mean_u, mean_s, cov_gs = self.balance.unbind(-1)
        return ((self.beta[:, 0] * mean_u + cov_gs) / mean_s).clamp_min(EPS)[:, None]

    @torch.no_grad()
    def hold_balance(self, blocks: Tensor | dict[str, Tensor], turnover: Tensor | None = None) -> None:
        """Tie ``gamma`` to ``beta`` so that the spliced equation balances the data's mean exactly.

        The stationary population-balance equation gives ``E[ds/dt] = -E[g s]`` for every field of this
        family, whatever its drive: ``gamma = (beta E[u] + E[g s]) / E[s]`` (floored at ``EPS``). ``gamma``
        stops being a free parameter; the fit then sets ``beta`` and the drive. ``blocks`` and ``turnover`` are
        as in :func:`moment_rates`.
        """
        m = _as_moments(blocks, turnover)
        self.balance = torch.stack((m["u"], m["s"].clamp_min(1e-12), m["gs"]), -1).to(self.beta_raw)
        self.gamma_raw.requires_grad_(False)

    @torch.no_grad()
    def fix_gamma(self, gamma: Tensor) -> None:
        """Hold ``gamma`` (``[genes]``, positive) at exactly these values from now on, in place of the balance or
        the fitted value (the velocities' read-out, see ``fv.tl.velocity(steady_state_ratio=...)``)."""
        self.fixed_gamma = gamma.to(self.gamma_raw).reshape(-1, 1).clone()
        self.gamma_raw.requires_grad_(False)

    def parameters(self, recurse: bool = True):  # noqa: D102 - only the trainable ones
        return (p for p in super().parameters(recurse) if p.requires_grad)

    def _pre(self, u: Tensor, s: Tensor) -> Tensor:
        if self.drive_centre is None:
            return self.a * u + self.b * s + self.c
        centre_u, centre_s = self.drive_centre[:, :1], self.drive_centre[:, 1:]
        return (self.a * (u - centre_u) + self.b * (s - centre_s)) / self.drive_unit + self.c

    @torch.no_grad()
    def centre_drive(self, blocks: Tensor | dict[str, Tensor], unit: float) -> None:
        """Let ``a`` and ``b`` act on ``(x - E[x]) / unit`` (the same family, reparametrised).

        Adam moves every raw parameter by about its learning rate per step. Far from the origin (a scaled gene
        whose mean is many standard deviations) such a step in ``a`` or ``b`` changes the drive by a large
        amount; centred and in units of the spread, all drive coefficients move on the same footing.
        :meth:`rates` still reports ``a``, ``b`` and ``c`` of the uncentred form ``softplus(a u + b s + c)``.
        ``blocks`` are as in :func:`moment_rates` (only the means are used).
        """
        m = _as_moments(blocks, None)
        before = self.rates()
        self.drive_centre = torch.stack((m["u"], m["s"]), -1).to(self.a)
        self.drive_unit = torch.tensor(float(unit), dtype=self.a.dtype, device=self.a.device)
        self.a.copy_(before["a"][:, None] * self.drive_unit)
        self.b.copy_(before["b"][:, None] * self.drive_unit)
        centre_u, centre_s = self.drive_centre.unbind(-1)
        self.c.copy_((before["c"] + before["a"] * centre_u + before["b"] * centre_s)[:, None])

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
        slope_u = self.a if self.drive_centre is None else self.a / self.drive_unit
        return slope_u * torch.sigmoid(self._pre(z[..., 0], z[..., 1])) - self.beta - self.gamma

    def rates(self) -> dict[str, Tensor]:
        """Per-gene parameters in their natural units: drive coefficients a, b, c and rates beta, gamma."""
        a, b, c = (p.detach()[:, 0].clone() for p in (self.a, self.b, self.c))
        if self.drive_centre is not None:  # back to softplus(a u + b s + c)
            a, b = a / self.drive_unit, b / self.drive_unit
            c = c - a * self.drive_centre[:, 0] - b * self.drive_centre[:, 1]
        return {
            "a": a,
            "b": b,
            "c": c,
            "beta": self.beta.detach()[:, 0],
            "gamma": self.gamma.detach()[:, 0],
        }

    def take(self, genes: Tensor | np.ndarray) -> KineticField:
        """The same field restricted to the genes at positions ``genes`` (the family is gene-local)."""
        index = torch.as_tensor(np.asarray(genes), dtype=torch.long, device=self.a.device)
        sub = copy.deepcopy(self)
        for name, p in sub._parameters.items():
            sub._parameters[name] = nn.Parameter(p.detach()[index].clone(), requires_grad=p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None and b.dim() and b.shape[0] == self.n_genes:
                sub._buffers[name] = b[index].clone()
        sub.n_genes = int(index.numel())
        return sub

    @torch.no_grad()
    def start_at(self, rates: dict[str, Tensor]) -> None:
        """Set ``beta``, ``gamma`` and a constant drive ``alpha`` per gene (``a = b = 0``), e.g. from
        :func:`moment_rates`. Each rate is a ``[genes]`` tensor; values are floored at ``2 * EPS``."""
        for name, raw in (("beta", self.beta_raw), ("gamma", self.gamma_raw), ("alpha", self.c)):
            rate = rates[name].to(raw).clamp_min(2 * EPS) - EPS
            raw.copy_((rate + torch.log(-torch.expm1(-rate)))[:, None])  # softplus^-1
        self.a.zero_()
        self.b.zero_()


def moment_rates(blocks: Tensor | dict[str, Tensor], turnover: Tensor | None = None) -> dict[str, Tensor]:
    r"""Rates of the constant-drive kinetic field that balance the data's moments, per gene.

    Under drift ``f``, unit diffusion (``-div(p f) + lap p + g p = 0``) and turnover ``g`` with mean 0, every
    test function ``phi`` has ``E[f . grad phi + lap phi + g phi] = 0``. For ``f = (alpha - beta u, beta u -
    gamma s)``, ``phi = u``, ``u^2`` and ``s`` give in turn

    .. math::
        \beta = \frac{1 + E[g u^2]/2 - E[u]\,E[g u]}{\mathrm{Var}(u)},\quad
        \alpha = \beta E[u] - E[g u],\quad
        \gamma = \frac{\beta E[u] + E[g s]}{E[s]}.

    These are the exact balance of the linear model; a Flux Matching fit started here refines it.

    Parameters
    ----------
    blocks
        ``[genes, cells, 2]`` abundances ``(u, s)`` in the fit's coordinates, or their
        :func:`balance_moments` (for data read in blocks of genes).
    turnover
        ``[cells]`` turnover rates with mean 0, or None (ignored when ``blocks`` are moments).

    Returns
    -------
    ``alpha``, ``beta`` and ``gamma``, each ``[genes]``; non-positive solutions are floored later by
    :meth:`KineticField.start_at`.
    """
    m = _as_moments(blocks, turnover)
    beta = (1 + m["guu"] / 2 - m["u"] * m["gu"]) / m["var_u"].clamp_min(1e-12)
    return {
        "alpha": (beta * m["u"] - m["gu"]).float(),
        "beta": beta.float(),
        "gamma": ((beta * m["u"] + m["gs"]) / m["s"].clamp_min(1e-12)).float(),
    }


def balance_moments(blocks: Tensor, turnover: Tensor | None = None) -> dict[str, Tensor]:
    """Per gene, in float64: ``E[u]``, ``E[s]``, ``Var(u)`` and ``E[g u]``, ``E[g s]``, ``E[g u^2]`` (0 without g).

    Each is a reduction over the cells of one gene, so blocks of genes give the same values as all genes at once.
    """
    x = blocks.double()
    u, s = x[..., 0], x[..., 1]
    g = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if turnover is None else turnover.to(x)
    return {
        "u": u.mean(1), "s": s.mean(1), "var_u": u.var(1, unbiased=False),
        "gu": (u * g).mean(1), "gs": (s * g).mean(1), "guu": (u * u * g).mean(1),
    }  # fmt: skip


def _as_moments(blocks: Tensor | dict[str, Tensor], turnover: Tensor | None) -> dict[str, Tensor]:
    return blocks if isinstance(blocks, dict) else balance_moments(blocks, turnover)


class LinearKineticField(KineticField):
    """Steady-state linear kinetics: constant transcription ``softplus(c) + 1e-6`` per gene.

    The special case ``a = b = 0`` of :class:`KineticField`; ``a`` and ``b`` are fixed at zero.
    """

    def __init__(self, n_genes: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_genes, dtype=dtype)
        for name in ("a", "b"):
            self.get_parameter(name).requires_grad_(False)
