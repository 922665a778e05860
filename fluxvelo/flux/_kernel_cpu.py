"""Fused numba CPU kernels for small blocks: the quantities of :mod:`._kernel`, in a few vectorised passes.

The torch path builds each ``[G, N, B]`` kernel in memory and walks it some ten times (distances, softmax,
products). Here every query loops over the samples while they sit in L1: distances, a shifted exponential and
the weighted moments, with the samples of a block stored contiguously per dimension (``[G, d, B]``) so that the
loops vectorise. The exponential is a vectorisable polynomial (relative error 1e-7 near 0, growing like the
float32 argument's own rounding, 1e-7 |t|), because a scalar ``exp`` call per kernel entry would cost more than
the whole torch path.

All functions take and fill float32 arrays laid out ``[G, d, N]``; each block's queries are cut into pieces
so that one large block parallelises as well as many small ones.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

# exp(t) = 2^k 2^f with k = round(t log2 e) and |f| <= 1/2; 2^f by a degree-6 polynomial fitted at Chebyshev
# nodes. Below 2^CUT_EXPONENT (about 8e-25) the result is exactly 0: the weights are shifted so that the largest
# is 1, so no normalised weight can tell the difference, and tiny weights would make their products subnormal,
# which x86 computes about a hundred times slower (the kernels ran 12x slower at the paper's sigma2 = 1e-3).
_NODES = 0.5 * np.cos(np.pi * (np.arange(64) + 0.5) / 64)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (np.float32(c) for c in np.polynomial.polynomial.polyfit(_NODES, 2.0**_NODES, 6))
_LOG2E = np.float32(np.log2(np.e))
EXP_FLOOR = np.float32(-87.0)
LANES = 16
CUT_EXPONENT = -80
_CUT_BITS = np.int32(CUT_EXPONENT << 23)


@njit(fastmath=True, cache=True, inline="always")
def _sq_dist(x: np.ndarray, q: np.ndarray, out: np.ndarray, lanes: np.ndarray) -> np.float32:
    """``out[b] = |x[:, b] - q|^2`` for samples ``x [d, B]`` and one query ``q [d]``; returns the minimum.

    ``lanes`` is scratch of length :data:`LANES`.
    """
    if x.shape[0] == 2:  # the velocity case, in one pass
        x0, x1, q0, q1 = x[0], x[1], q[0], q[1]
        for b in range(x.shape[1]):
            r0 = x0[b] - q0
            r1 = x1[b] - q1
            out[b] = r0 * r0 + r1 * r1
    else:
        out[:] = 0
        for k in range(x.shape[0]):
            qk = q[k]
            xk = x[k]
            for b in range(x.shape[1]):
                r = xk[b] - qk
                out[b] += r * r
    return _min(out, lanes)


@njit(fastmath=True, cache=True, inline="always")
def _min(values: np.ndarray, lanes: np.ndarray) -> np.float32:
    """Minimum of a 1-D array. A plain ``min`` loop is one long dependency chain that LLVM does not vectorise;
    :data:`LANES` independent running minima are element-wise and do (twice as fast at 256 values)."""
    lanes[:] = np.inf
    n = values.shape[0]
    for start in range(0, n - LANES + 1, LANES):
        for lane in range(LANES):
            v = values[start + lane]
            lanes[lane] = v if v < lanes[lane] else lanes[lane]
    low = lanes.min()
    for b in range(n - n % LANES, n):
        low = min(low, values[b])
    return low


@njit(fastmath=True, cache=True, inline="always")
def _exp_inplace(t: np.ndarray, shift: np.float32, scale: np.float32, k_bits: np.ndarray) -> None:
    """``t = exp((shift - t) * scale)`` for ``t >= shift``, 0 below ``2^CUT_EXPONENT``; ``k_bits`` is scratch."""
    for b in range(t.shape[0]):
        y = max((shift - t[b]) * scale, EXP_FLOOR) * _LOG2E
        k = np.floor(y + np.float32(0.5))
        f = y - k
        p = _C6 * f + _C5
        p = p * f + _C4
        p = p * f + _C3
        p = p * f + _C2
        p = p * f + _C1
        t[b] = p * f + _C0
        k_bits[b] = np.int32(k) << 23
    # multiply by 2^k by adding k to the float's exponent field, or give 0 below 2^CUT_EXPONENT
    bits = t.view(np.int32)
    for b in range(t.shape[0]):
        k = k_bits[b]
        bits[b] = bits[b] + k if k >= _CUT_BITS else 0


@njit(fastmath=True, cache=True, inline="always")
def _kernel_row(
    x: np.ndarray, q: np.ndarray, inv_two_var: np.float32, w: np.ndarray, k_bits: np.ndarray, lanes: np.ndarray
) -> np.float32:
    """Unnormalised weights ``w_b = exp(-(|x_b - q|^2 - min_b |x_b - q|^2) / (2 var))``; returns the minimum."""
    low = _sq_dist(x, q, w, lanes)
    _exp_inplace(w, low, inv_two_var, k_bits)
    return low


@njit(fastmath=True, cache=True, inline="always")
def _weighted_offsets(x: np.ndarray, q: np.ndarray, w: np.ndarray, offset: np.ndarray) -> np.float32:
    """``offset = sum_b w_b (x_b - q) / sum_b w_b``; returns ``sum_b w_b``."""
    total = np.float32(0)
    if x.shape[0] == 2:
        x0, x1, q0, q1 = x[0], x[1], q[0], q[1]
        acc0 = np.float32(0)
        acc1 = np.float32(0)
        for b in range(w.shape[0]):
            total += w[b]
            acc0 += w[b] * (x0[b] - q0)
            acc1 += w[b] * (x1[b] - q1)
        offset[0] = acc0 / total
        offset[1] = acc1 / total
        return total
    for b in range(w.shape[0]):
        total += w[b]
    for k in range(x.shape[0]):
        acc = np.float32(0)
        qk = q[k]
        xk = x[k]
        for b in range(w.shape[0]):
            acc += w[b] * (xk[b] - qk)
        offset[k] = acc / total
    return total


@njit(fastmath=True, cache=True, inline="always")
def _row_scratch(n_samples: int, dim: int):
    """Per-task scratch: weights, exponent bits, running minima and one query point."""
    w = np.empty(n_samples, np.float32)
    return w, np.empty(n_samples, np.int32), np.empty(LANES, np.float32), np.empty(dim, np.float32)


@njit(parallel=True, fastmath=True, cache=True)
def mean_offset(z: np.ndarray, x: np.ndarray, inv_two_var: np.float32, out: np.ndarray, pieces: int) -> None:
    """``out = m(z) - z``: kernel-weighted mean of the samples ``x [G, d, B]`` minus each query ``z [G, d, N]``."""
    n_blocks, dim, n_queries = z.shape
    per_piece = (n_queries + pieces - 1) // pieces
    for task in prange(n_blocks * pieces):
        g, start = task // pieces, (task % pieces) * per_piece
        xg = x[g]
        w, k_bits, lanes, q = _row_scratch(x.shape[2], dim)
        offset = np.empty(dim, np.float32)
        for n in range(start, min(start + per_piece, n_queries)):
            q[:] = z[g, :, n]
            _kernel_row(xg, q, inv_two_var, w, k_bits, lanes)
            _weighted_offsets(xg, q, w, offset)
            out[g, :, n] = offset


@njit(parallel=True, fastmath=True, cache=True)
def score_terms(
    z: np.ndarray,
    x: np.ndarray,
    f: np.ndarray,
    turnover: np.ndarray,
    sigma2: np.float32,
    s_out: np.ndarray,
    t_out: np.ndarray,
    pieces: int,
) -> None:
    """The score ``s(z)`` and ``J_s (f - 2 s) - grad div s - grad g_sigma`` at ``z``; see ``_kernel.score_gradient_terms``.

    With centred samples ``y_b = x_b - m``: ``J_s v = Cov_w(x) v / sigma2^2 - v / sigma2``,
    ``grad div s = E_w[y |y|^2] / sigma2^3`` and ``grad g_sigma = E_w[y g] / sigma2``. ``turnover`` holds the
    samples' turnover ``g`` as ``[G, B]`` or ``[1, B]`` (shared by all blocks); an empty ``[1, 0]`` means none.
    """
    n_blocks, dim, n_queries = z.shape
    n_samples = x.shape[2]
    per_piece = (n_queries + pieces - 1) // pieces
    inv_two_var = np.float32(0.5) / sigma2
    for task in prange(n_blocks * pieces):
        g, start = task // pieces, (task % pieces) * per_piece
        xg = x[g]
        has_turnover = turnover.shape[1] > 0
        turnover_g = turnover[g if turnover.shape[0] > 1 else 0]
        w, k_bits, lanes, q = _row_scratch(n_samples, dim)
        y2 = np.empty(n_samples, np.float32)
        yv = np.empty(n_samples, np.float32)
        m = np.empty(dim, np.float32)
        v = np.empty(dim, np.float32)
        offset = np.empty(dim, np.float32)
        for n in range(start, min(start + per_piece, n_queries)):
            q[:] = z[g, :, n]
            _kernel_row(xg, q, inv_two_var, w, k_bits, lanes)
            weight_sum = _weighted_offsets(xg, q, w, offset)
            for k in range(dim):
                m[k] = q[k] + offset[k]
                v[k] = f[g, k, n] - 2 * offset[k] / sigma2
            # |y_b|^2 and y_b . v, from differences to keep float32 accurate
            y2[:] = 0
            yv[:] = 0
            for k in range(dim):
                xk = xg[k]
                mk, vk = m[k], v[k]
                for b in range(n_samples):
                    y = xk[b] - mk
                    y2[b] += y * y
                    yv[b] += y * vk
            for k in range(dim):
                xk = xg[k]
                mk = m[k]
                cov_v = np.float32(0)
                third = np.float32(0)
                cov_g = np.float32(0)
                for b in range(n_samples):
                    wy = w[b] * (xk[b] - mk)
                    cov_v += wy * yv[b]
                    third += wy * y2[b]
                if has_turnover:
                    for b in range(n_samples):
                        cov_g += w[b] * (xk[b] - mk) * turnover_g[b]
                cov_v /= weight_sum
                third /= weight_sum
                cov_g /= weight_sum
                s_out[g, k, n] = offset[k] / sigma2
                t_out[g, k, n] = cov_v / sigma2**2 - v[k] / sigma2 - third / sigma2**3 - cov_g / sigma2


@njit(parallel=True, fastmath=True, cache=True)
def pull_back(
    mu: np.ndarray, zt: np.ndarray, inv_two_var: np.float32, target: np.ndarray, out: np.ndarray, pieces: int
) -> None:
    """``out_i = sum_j W_ij target_j`` with ``W_ij`` the softmax over anchors ``i`` of ``-|mu_i - zt_j|^2 / (2 var)``.

    Two passes keep both parallel and free of scatter: per endpoint ``j`` its nearest-anchor distance and
    normaliser, then per anchor ``i`` the sum over endpoints.
    """
    n_blocks, dim, n_anchors = mu.shape
    n_ends = zt.shape[2]
    low = np.empty((n_blocks, n_ends), np.float32)
    inv_norm = np.empty((n_blocks, n_ends), np.float32)
    per_piece = (n_ends + pieces - 1) // pieces
    for task in prange(n_blocks * pieces):
        g, start = task // pieces, (task % pieces) * per_piece
        mu_g = mu[g]
        w, k_bits, lanes, q = _row_scratch(n_anchors, dim)
        for j in range(start, min(start + per_piece, n_ends)):
            q[:] = zt[g, :, j]
            low[g, j] = _kernel_row(mu_g, q, inv_two_var, w, k_bits, lanes)
            inv_norm[g, j] = 1 / w.sum()
    # fold each endpoint's normaliser into its target
    scaled = target * inv_norm.reshape(n_blocks, 1, n_ends)
    per_piece = (n_anchors + pieces - 1) // pieces
    for task in prange(n_blocks * pieces):
        g, start = task // pieces, (task % pieces) * per_piece
        zt_g, low_g, scaled_g = zt[g], low[g], scaled[g]
        w, k_bits, lanes, q = _row_scratch(n_ends, dim)
        for a in range(start, min(start + per_piece, n_anchors)):
            q[:] = mu[g, :, a]
            _sq_dist(zt_g, q, w, lanes)
            # shifted by each endpoint's own nearest anchor, so every exponent is <= 0
            for j in range(n_ends):
                w[j] -= low_g[j]
            _exp_inplace(w, np.float32(0), inv_two_var, k_bits)
            for k in range(dim):
                acc = np.float32(0)
                tk = scaled_g[k]
                for j in range(n_ends):
                    acc += w[j] * tk[j]
                out[g, k, a] = acc


def pieces(n_blocks: int) -> int:
    """Pieces to cut each block's queries into, so that there are a few tasks per thread to balance."""
    return -(-4 * numba.get_num_threads() // n_blocks)


def warm_up(names) -> None:
    """Compile the kernels ``names`` by calling each on tiny inputs of the types that ``._kernel`` passes."""
    z = np.zeros((1, 2, 4), np.float32)
    calls = {
        "mean_offset": lambda: mean_offset(z, z, np.float32(1), z.copy(), 1),
        "score_terms": lambda: score_terms(
            z, z, z, np.zeros((1, 0), np.float32), np.float32(1), z.copy(), z.copy(), 1
        ),
        "pull_back": lambda: pull_back(z, z, np.float32(1), z, z.copy(), 1),
    }
    for name in names:
        calls[name]()
