"""The smoothed empirical density's score and its derivatives, in closed form.

One batch is laid out in blocks, ``x: [G, B, d]``: G independent problems (genes, or one image block) that
share B samples of dimension d. Smoothing the samples with ``N(0, sigma2 I)`` gives, per block, a Gaussian
mixture whose score at ``z`` is ``(m(z) - z) / sigma2``, with ``m`` the kernel-weighted mean of the samples.
Its derivatives are kernel-weighted moments too, so nothing here needs autograd:

- Jacobian ``J_s = Cov_w(x) / sigma2^2 - I / sigma2`` (symmetric);
- gradient of the divergence ``grad div s = E_w[(x - m) |x - m|^2] / sigma2^3``.

Distances in small blocks (velocity: d = 2) come from explicit differences ``x_b - z_n``, which keep float32
accurate when sigma is small against the data's magnitude; large blocks (images) use matrix products.
Work is split into chunks of blocks so that the ``[G, N, B]`` kernel never has to fit in memory at once.
On the CPU, 2-D float32 blocks go to the fused loops of :mod:`._kernel_cpu` instead (``settings.fused_kernels``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._settings import settings

# Kernel entries (block x query x sample) per chunk. On the CPU 1 MiB of float32 stays in cache, which
# measured several times faster than large chunks; on a GPU large chunks keep the launches few.
CPU_CHUNK_ELEMENTS = 1 << 18
GPU_CHUNK_ELEMENTS = 1 << 26
# Blocks up to this dimension form distances from differences; larger ones from matrix products.
DIRECT_MAX_DIM = 8


def block_chunks(n_blocks: int, n_queries: int, n_samples: int, device: torch.device) -> list[slice]:
    """Slices over blocks such that each chunk's kernel holds a cache- or launch-friendly number of entries."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    step = max(1, budget // max(1, n_queries * n_samples))
    return [slice(i, min(i + step, n_blocks)) for i in range(0, n_blocks, step)]


def serves_fused(z: Tensor) -> bool:
    """Whether the fused CPU loops serve queries like ``z`` (``[G, N, d]``): float32 on the CPU, in 2-D blocks (a
    gene's ``(u, s)``, a 2-D toy distribution)."""
    return settings.fused_kernels and z.device.type == "cpu" and z.dtype == torch.float32 and z.shape[-1] == 2


def _cpu_kernels():
    """The numba module, and the threads to run it on: the fit's count (from the free cores) or, outside a fit,
    torch's (fluxvelo._threads)."""
    from .._jit import FIT_KERNELS, load_kernels
    from .._threads import kernel_threads

    return load_kernels(*FIT_KERNELS), kernel_threads()


def _dims_first(t: Tensor):
    """``[G, N, d]`` tensor to a contiguous ``[G, d, N]`` float32 array for the fused loops."""
    return t.detach().transpose(1, 2).contiguous().numpy()


def _dims_last(a) -> Tensor:
    return torch.from_numpy(a).transpose(1, 2)


def _sq_distances(z: Tensor, x: Tensor) -> Tensor:
    """``|x_b - z_n|^2``, ``[g, N, B]``: differences per dimension for small blocks, matrix products otherwise."""
    if z.shape[-1] <= DIRECT_MAX_DIM:
        out = None
        for k in range(z.shape[-1]):
            diff = x[..., k].unsqueeze(1) - z[..., k].unsqueeze(2)
            out = diff.mul_(diff) if out is None else out.addcmul_(diff, diff)
        return out
    c = x.mean(1, keepdim=True)
    xc, zc = x - c, z - c
    dist = torch.baddbmm(xc.square().sum(-1).unsqueeze(1), zc, xc.transpose(1, 2), alpha=-2.0)
    return (dist + zc.square().sum(-1, keepdim=True)).clamp_min_(0.0)


def kernel_weights(z: Tensor, x: Tensor, scale2: float) -> Tensor:
    """``w[g, n, b]``: softmax over samples ``b`` of ``-|z_n - x_b|^2 / (2 scale2)``."""
    return torch.softmax(_sq_distances(z, x).mul_(-0.5 / scale2), dim=-1)


def _weighted_offset(w: Tensor, z: Tensor, x: Tensor) -> Tensor:
    """``m - z`` with ``m = w @ x``, computed about the block mean to keep float32 accurate."""
    c = x.mean(1, keepdim=True)
    return torch.bmm(w, x - c) - (z - c)


def kernel_mean_offset(z: Tensor, x: Tensor, sigma2: float) -> Tensor:
    """``m(z) - z``, the kernel-weighted mean of the samples minus the query, ``[G, N, d]``.

    The score is ``(m(z) - z) / sigma2``.
    """
    if serves_fused(z):
        (cpu, threads), z_, x_ = _cpu_kernels(), _dims_first(z), _dims_first(x)
        out_ = np.empty_like(z_)
        cpu.mean_offset(z_, x_, np.float32(0.5 / sigma2), out_, threads)
        return _dims_last(out_)
    out = torch.empty_like(z)
    for sl in block_chunks(z.shape[0], z.shape[1], x.shape[1], z.device):
        out[sl] = _weighted_offset(kernel_weights(z[sl], x[sl], sigma2), z[sl], x[sl])
    return out


def score(z: Tensor, x: Tensor, sigma2: float) -> Tensor:
    """Score of the smoothed empirical density of ``x`` (``[G, B, d]``) at ``z`` (``[G, N, d]``)."""
    return kernel_mean_offset(z, x, sigma2) / sigma2


def score_gradient_terms(
    z: Tensor, x: Tensor, sigma2: float, f: Tensor, turnover: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The kernel's share of ``grad_z (r - g_sigma)`` at ``z``, where ``r = div u + u . s`` and ``u = f - s``.

    With ``J_s`` symmetric, ``grad (u . s) = J_f^T s + J_s (f - 2 s)``, so the part that involves the score's
    derivatives is ``J_s (f - 2 s) - grad div s``; the field's part is left to the caller. With a turnover
    ``g`` per sample (population balance), ``g_sigma(z) = sum_b w_b(z) g_b`` is its kernel-smoothed value and
    ``grad g_sigma = Cov_w(x, g) / sigma2`` is subtracted too.

    Parameters
    ----------
    z
        Query points ``[G, N, d]``.
    x
        Samples ``[G, B, d]``.
    sigma2
        Kernel bandwidth.
    f
        The field at ``z``, ``[G, N, d]``.
    turnover
        The samples' turnover rates, ``[B]`` (shared by all blocks) or ``[G, B]``; None for none.

    Returns
    -------
    score
        ``s(z)``, ``[G, N, d]``.
    terms
        ``J_s(z) (f - 2 s) - grad div s(z) - grad g_sigma(z)``, ``[G, N, d]``.
    """
    if turnover is not None:
        turnover = turnover.reshape(-1, x.shape[1]).to(x.dtype)
        if turnover.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"turnover must have shape [B] or [G, B]; got {tuple(turnover.shape)} for x {tuple(x.shape)}.")
    if serves_fused(z):
        (cpu, threads), z_, x_, f_ = _cpu_kernels(), _dims_first(z), _dims_first(x), _dims_first(f)
        g_ = np.zeros((1, 0), np.float32) if turnover is None else np.ascontiguousarray(turnover.detach().numpy())
        s_, t_ = np.empty_like(z_), np.empty_like(z_)
        cpu.score_terms(z_, x_, f_, g_, np.float32(sigma2), s_, t_, threads)
        return _dims_last(s_), _dims_last(t_)
    if turnover is not None:
        turnover = turnover.expand(x.shape[0], -1)
    s_out, t_out = torch.empty_like(z), torch.empty_like(z)
    for sl in block_chunks(z.shape[0], z.shape[1], x.shape[1], z.device):
        zc, xc = z[sl], x[sl]
        w = kernel_weights(zc, xc, sigma2)
        offset = _weighted_offset(w, zc, xc)  # m - z
        s = offset / sigma2
        v = f[sl] - 2 * s
        # Centred samples y_b = x_b - m per query enter only through y.v and |y|^2, formed from differences
        # so that float32 stays accurate when sigma is small against the data's spread.
        yv = torch.zeros_like(w)
        y2 = torch.zeros_like(w)
        for k in range(z.shape[-1]):
            y_k = xc[..., k].unsqueeze(1) - (zc[..., k] + offset[..., k]).unsqueeze(2)
            yv.addcmul_(y_k, v[..., k].unsqueeze(2))
            y2.addcmul_(y_k, y_k)
        # sum_b w_b a_b y_b = (w a) @ (x - c) - (m - c) sum_b w_b a_b, for a = y.v (covariance) and |y|^2 (third moment)
        c = xc.mean(1, keepdim=True)
        m_c = zc + offset - c
        wyv, wy2 = w * yv, w * y2
        cov_v = torch.bmm(wyv, xc - c) - m_c * wyv.sum(-1, keepdim=True)
        third = torch.bmm(wy2, xc - c) - m_c * wy2.sum(-1, keepdim=True)
        s_out[sl] = s
        t_out[sl] = cov_v / sigma2**2 - v / sigma2 - third / sigma2**3
        if turnover is not None:
            wg = w * turnover[sl].unsqueeze(1)  # [g, N, B]
            t_out[sl] -= (torch.bmm(wg, xc - c) - m_c * wg.sum(-1, keepdim=True)) / sigma2
    return s_out, t_out


def pull_back(mu: Tensor, zt: Tensor, var: float, g: Tensor) -> Tensor:
    """``sum_j W_ij g_j`` per block, with ``W_ij`` the softmax over anchors ``i`` of ``-|mu_i - zt_j|^2 / (2 var)``.

    ``mu`` are the anchors' predicted means ``[G, B, d]``, ``zt`` the endpoints and ``g`` their targets
    ``[G, B, d]``; the result lives at the anchors, ``[G, B, d]``.
    """
    if serves_fused(mu):
        (cpu, threads), mu_, zt_, g_ = _cpu_kernels(), _dims_first(mu), _dims_first(zt), _dims_first(g)
        out_ = np.empty_like(mu_)
        cpu.pull_back(mu_, zt_, np.float32(0.5 / var), g_, out_, threads)
        return _dims_last(out_)
    out = torch.empty_like(mu)
    for sl in block_chunks(mu.shape[0], zt.shape[1], mu.shape[1], mu.device):
        w = kernel_weights(zt[sl], mu[sl], var)  # [g, j, i], normalised over anchors i
        out[sl] = torch.bmm(w.transpose(1, 2), g[sl])
    return out
