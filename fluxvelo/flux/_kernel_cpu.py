"""Fused numba CPU kernels for small blocks: the quantities of :mod:`._kernel`, in a few vectorised passes.

The torch path builds each ``[G, N, B]`` kernel in memory and walks it some ten times (distances, softmax,
products). Here every query loops over the samples while they sit in L1: distances, a shifted exponential and
the weighted moments, with the samples of a block stored contiguously per dimension (``[G, d, B]``) so that the
loops vectorise. The exponential is a vectorisable polynomial (relative error 1e-7 near 0, growing like the
float32 argument's own rounding, 1e-7 |t|), because a scalar ``exp`` call per kernel entry would cost more than
the whole torch path.

All kernels take and fill float32 arrays laid out ``[G, d, N]``. Each is a serial loop over one rectangle of
the work, blocks ``g0:g1`` by queries ``n0:n1``, that releases the GIL; :func:`_run` runs it over the rectangles
of :func:`tasks` on a few Python threads that share one queue. numba's own parallel loops (``prange``) did this
before, at two costs: their compile (about 7 s of the 10 to 13 s that the first fit after installation spent
compiling, against 3.5 s for the serial loops alone; ``benchmarks/compile_time.py``), and a thread pool that spins
while it waits, which took the core of any neighbouring process. Inside the loops, arrays are only indexed, never
sliced or passed as small scratch: a serial loop pays atomic reference counts for each array view, which made an
earlier serial version 1.4 to 2.8 times slower than the parallel loops on one thread.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

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
#: Rectangles per thread that :func:`tasks` cuts the work into, so that a thread another process slows is helped out.
TASKS_PER_THREAD = 4

# The pool of helper threads that :func:`_run` shares out the rectangles to, and its size.
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


@njit(fastmath=True, cache=True, inline="always")
def _min(values: np.ndarray, lanes: np.ndarray) -> np.float32:
    """Minimum of a 1-D array. A plain ``min`` loop is one long dependency chain that LLVM does not vectorise;
    :data:`LANES` independent running minima are element-wise and do (twice as fast at 256 values)."""
    n = values.shape[0]
    for lane in range(LANES):
        lanes[lane] = np.inf
    for start in range(0, n - LANES + 1, LANES):
        for lane in range(LANES):
            v = values[start + lane]
            lanes[lane] = v if v < lanes[lane] else lanes[lane]
    low = lanes[0]
    for lane in range(1, LANES):
        low = min(low, lanes[lane])
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
def _sq_dist(x: np.ndarray, g: int, q: np.ndarray, n: int, out: np.ndarray) -> None:
    """``out[b] = |x[g, :, b] - q[g, :, n]|^2``."""
    for b in range(x.shape[2]):
        out[b] = 0
    for k in range(x.shape[1]):
        qk = q[g, k, n]
        for b in range(x.shape[2]):
            r = x[g, k, b] - qk
            out[b] += r * r


@njit(fastmath=True, cache=True, inline="always")
def _kernel_row(
    x: np.ndarray, g: int, q: np.ndarray, n: int, inv_two_var: np.float32, w: np.ndarray, k_bits: np.ndarray,
    lanes: np.ndarray,
) -> np.float32:  # fmt: skip
    """Unnormalised weights ``w_b = exp(-(|x_b - q_n|^2 - min_b |x_b - q_n|^2) / (2 var))`` in block ``g``;
    returns the minimum."""
    _sq_dist(x, g, q, n, w)
    low = _min(w, lanes)
    _exp_inplace(w, low, inv_two_var, k_bits)
    return low


@njit(fastmath=True, cache=True, inline="always")
def _sum(w: np.ndarray) -> np.float32:
    total = np.float32(0)
    for b in range(w.shape[0]):
        total += w[b]
    return total


@njit(fastmath=True, cache=True, inline="always")
def _weighted_offset(x: np.ndarray, g: int, k: int, q: np.ndarray, n: int, w: np.ndarray, total: np.float32):
    """``sum_b w_b (x[g, k, b] - q[g, k, n]) / total``. Helpers return scalars: writing a small scratch array
    instead made the loops 20% slower."""
    qk = q[g, k, n]
    acc = np.float32(0)
    for b in range(w.shape[0]):
        acc += w[b] * (x[g, k, b] - qk)
    return acc / total


@njit(fastmath=True, cache=True, inline="always")
def _offsets_2d(x: np.ndarray, g: int, q: np.ndarray, n: int, w: np.ndarray):
    """For ``d = 2`` (velocity), in one pass over the weights: ``sum_b w_b`` and both weighted offsets (the
    rollout means' loop ran 4.9 ms against 5.6 ms with three passes, pancreas-sized batch)."""
    q0, q1 = q[g, 0, n], q[g, 1, n]
    total, acc0, acc1 = np.float32(0), np.float32(0), np.float32(0)
    for b in range(w.shape[0]):
        total += w[b]
        acc0 += w[b] * (x[g, 0, b] - q0)
        acc1 += w[b] * (x[g, 1, b] - q1)
    return total, acc0 / total, acc1 / total


@njit(fastmath=True, cache=True, nogil=True)
def mean_offset_rect(
    z: np.ndarray, x: np.ndarray, inv_two_var: np.float32, out: np.ndarray, g0: int, g1: int, n0: int, n1: int
) -> None:
    """``out = m(z) - z``: kernel-weighted mean of the samples ``x [G, d, B]`` minus each query ``z [G, d, N]``."""
    n_samples, dim = x.shape[2], x.shape[1]
    w, k_bits, lanes = np.empty(n_samples, np.float32), np.empty(n_samples, np.int32), np.empty(LANES, np.float32)
    for g in range(g0, g1):
        for n in range(n0, n1):
            _kernel_row(x, g, z, n, inv_two_var, w, k_bits, lanes)
            if dim == 2:
                _, out[g, 0, n], out[g, 1, n] = _offsets_2d(x, g, z, n, w)
                continue
            total = _sum(w)
            for k in range(dim):
                out[g, k, n] = _weighted_offset(x, g, k, z, n, w, total)


@njit(fastmath=True, cache=True, nogil=True)
def score_terms_rect(
    z: np.ndarray,
    x: np.ndarray,
    f: np.ndarray,
    turnover: np.ndarray,
    sigma2: np.float32,
    s_out: np.ndarray,
    t_out: np.ndarray,
    g0: int,
    g1: int,
    n0: int,
    n1: int,
) -> None:
    """The score ``s(z)`` and ``J_s (f - 2 s) - grad div s - grad g_sigma`` at ``z``; see ``_kernel.score_gradient_terms``.

    With centred samples ``y_b = x_b - m``: ``J_s v = Cov_w(x) v / sigma2^2 - v / sigma2``,
    ``grad div s = E_w[y |y|^2] / sigma2^3`` and ``grad g_sigma = E_w[y g] / sigma2``. ``turnover`` holds the
    samples' turnover ``g`` as ``[G, B]`` or ``[1, B]`` (shared by all blocks); an empty ``[1, 0]`` means none.
    """
    n_samples, dim = x.shape[2], x.shape[1]
    inv_two_var = np.float32(0.5) / sigma2
    has_turnover = turnover.shape[1] > 0
    w, k_bits, lanes = np.empty(n_samples, np.float32), np.empty(n_samples, np.int32), np.empty(LANES, np.float32)
    y2, yv = np.empty(n_samples, np.float32), np.empty(n_samples, np.float32)
    m, v = np.empty(dim, np.float32), np.empty(dim, np.float32)
    for g in range(g0, g1):
        tg = g if turnover.shape[0] > 1 else 0
        for n in range(n0, n1):
            _kernel_row(x, g, z, n, inv_two_var, w, k_bits, lanes)
            weight_sum = _sum(w)  # no one-pass 2-D branch here: it added 1 to 1.5 s to this kernel's compile
            for k in range(dim):
                offset = _weighted_offset(x, g, k, z, n, w, weight_sum)
                m[k] = z[g, k, n] + offset
                v[k] = f[g, k, n] - 2 * offset / sigma2
                s_out[g, k, n] = offset / sigma2
            # |y_b|^2 and y_b . v, from differences to keep float32 accurate
            for b in range(n_samples):
                y2[b] = 0
                yv[b] = 0
            for k in range(dim):
                mk, vk = m[k], v[k]
                for b in range(n_samples):
                    y = x[g, k, b] - mk
                    y2[b] += y * y
                    yv[b] += y * vk
            for k in range(dim):
                mk = m[k]
                cov_v = np.float32(0)
                third = np.float32(0)
                cov_g = np.float32(0)
                for b in range(n_samples):
                    wy = w[b] * (x[g, k, b] - mk)
                    cov_v += wy * yv[b]
                    third += wy * y2[b]
                if has_turnover:
                    for b in range(n_samples):
                        cov_g += w[b] * (x[g, k, b] - mk) * turnover[tg, b]
                cov_v /= weight_sum
                third /= weight_sum
                cov_g /= weight_sum
                t_out[g, k, n] = cov_v / sigma2**2 - v[k] / sigma2 - third / sigma2**3 - cov_g / sigma2


@njit(fastmath=True, cache=True, nogil=True)
def endpoint_norms_rect(
    mu: np.ndarray, zt: np.ndarray, inv_two_var: np.float32, low: np.ndarray, inv_norm: np.ndarray,
    g0: int, g1: int, j0: int, j1: int,
) -> None:  # fmt: skip
    """:func:`pull_back`'s first pass: per endpoint ``j`` of ``zt [G, d, N]``, its nearest anchor's squared
    distance ``low [G, N]`` and the inverse of its softmax normaliser over the anchors ``mu``."""
    n_anchors = mu.shape[2]
    w, k_bits, lanes = np.empty(n_anchors, np.float32), np.empty(n_anchors, np.int32), np.empty(LANES, np.float32)
    for g in range(g0, g1):
        for j in range(j0, j1):
            low[g, j] = _kernel_row(mu, g, zt, j, inv_two_var, w, k_bits, lanes)
            inv_norm[g, j] = 1 / _sum(w)


@njit(fastmath=True, cache=True, nogil=True)
def anchor_sums_rect(
    mu: np.ndarray, zt: np.ndarray, inv_two_var: np.float32, low: np.ndarray, scaled: np.ndarray, out: np.ndarray,
    g0: int, g1: int, a0: int, a1: int,
) -> None:  # fmt: skip
    """:func:`pull_back`'s second pass: per anchor ``a``, ``out = sum_j W_aj target_j``, with ``scaled`` the
    targets times their endpoints' inverse normalisers and ``low`` their nearest-anchor distances."""
    n_ends, dim = zt.shape[2], zt.shape[1]
    w, k_bits = np.empty(n_ends, np.float32), np.empty(n_ends, np.int32)
    for g in range(g0, g1):
        for a in range(a0, a1):
            _sq_dist(zt, g, mu, a, w)
            # shifted by each endpoint's own nearest anchor, so every exponent is <= 0
            for j in range(n_ends):
                w[j] -= low[g, j]
            _exp_inplace(w, np.float32(0), inv_two_var, k_bits)
            for k in range(dim):
                acc = np.float32(0)
                for j in range(n_ends):
                    acc += w[j] * scaled[g, k, j]
                out[g, k, a] = acc


def tasks(n_blocks: int, n_items: int, threads: int) -> tuple[tuple[int, int, int, int], ...]:
    """Rectangles ``(g0, g1, n0, n1)`` that tile ``n_blocks x n_items``, about :data:`TASKS_PER_THREAD` per thread:
    runs of whole blocks, or pieces of each block's items where the blocks are fewer than the tasks (cached: a small
    call would otherwise spend a fifth of its time here)."""
    return _tasks(n_blocks, n_items, TASKS_PER_THREAD * threads)


@functools.lru_cache(maxsize=64)
def _tasks(n_blocks: int, n_items: int, n_tasks: int) -> tuple[tuple[int, int, int, int], ...]:
    if n_blocks >= n_tasks:
        edges = np.linspace(0, n_blocks, n_tasks + 1).astype(np.int64).tolist()
        return tuple((a, b, 0, n_items) for a, b in zip(edges[:-1], edges[1:]) if b > a)
    edges = np.linspace(0, n_items, -(-n_tasks // n_blocks) + 1).astype(np.int64).tolist()
    return tuple((g, g + 1, a, b) for g in range(n_blocks) for a, b in zip(edges[:-1], edges[1:]) if b > a)


def _run(kernel, args: tuple, n_blocks: int, n_items: int, threads: int) -> None:
    """``kernel(*args, g0, g1, n0, n1)`` for every rectangle of :func:`tasks` over ``n_blocks x n_items``, on
    ``threads`` threads.

    The calling thread works too; the others come from a pool and take rectangles from one shared queue, so a thread
    that another process slows is helped out. The kernels release the GIL, and nothing spins while it waits.
    """
    rectangles = tasks(n_blocks, n_items, threads)
    queue = iter(rectangles)

    def work() -> None:
        for g0, g1, n0, n1 in queue:
            kernel(*args, g0, g1, n0, n1)

    n_helpers = min(threads, len(rectangles)) - 1
    helpers = [_executor(n_helpers).submit(work) for _ in range(n_helpers)]
    work()
    for helper in helpers:
        helper.result()


def _executor(size: int) -> ThreadPoolExecutor:
    """The pool of helper threads, grown to at least ``size``."""
    global _pool, _pool_size
    if _pool is None or _pool_size < size:
        _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="fluxvelo-kernel"), size
    return _pool


def mean_offset(z: np.ndarray, x: np.ndarray, inv_two_var: np.float32, out: np.ndarray, threads: int) -> None:
    """:func:`mean_offset_rect` over blocks by queries, on ``threads`` threads."""
    _run(mean_offset_rect, (z, x, inv_two_var, out), out.shape[0], out.shape[2], threads)


def score_terms(
    z: np.ndarray, x: np.ndarray, f: np.ndarray, turnover: np.ndarray, sigma2: np.float32, s_out: np.ndarray,
    t_out: np.ndarray, threads: int,
) -> None:  # fmt: skip
    """:func:`score_terms_rect` over blocks by queries, on ``threads`` threads."""
    _run(score_terms_rect, (z, x, f, turnover, sigma2, s_out, t_out), z.shape[0], z.shape[2], threads)


def endpoint_norms(
    mu: np.ndarray, zt: np.ndarray, inv_two_var: np.float32, low: np.ndarray, inv_norm: np.ndarray, threads: int
) -> None:
    """:func:`endpoint_norms_rect` over blocks by endpoints, on ``threads`` threads."""
    _run(endpoint_norms_rect, (mu, zt, inv_two_var, low, inv_norm), low.shape[0], low.shape[1], threads)


def anchor_sums(
    mu: np.ndarray, zt: np.ndarray, inv_two_var: np.float32, low: np.ndarray, scaled: np.ndarray, out: np.ndarray,
    threads: int,
) -> None:  # fmt: skip
    """:func:`anchor_sums_rect` over blocks by anchors, on ``threads`` threads."""
    _run(anchor_sums_rect, (mu, zt, inv_two_var, low, scaled, out), out.shape[0], out.shape[2], threads)


def pull_back(
    mu: np.ndarray, zt: np.ndarray, inv_two_var: np.float32, target: np.ndarray, out: np.ndarray, threads: int
) -> None:
    """``out_i = sum_j W_ij target_j`` with ``W_ij`` the softmax over anchors ``i`` of ``-|mu_i - zt_j|^2 / (2 var)``.

    Two passes keep both parallel and free of scatter: per endpoint ``j`` its nearest-anchor distance and
    normaliser (:func:`endpoint_norms`), then per anchor ``i`` the sum over endpoints (:func:`anchor_sums`).
    """
    n_blocks, n_ends = zt.shape[0], zt.shape[2]
    low = np.empty((n_blocks, n_ends), np.float32)
    inv_norm = np.empty((n_blocks, n_ends), np.float32)
    endpoint_norms(mu, zt, inv_two_var, low, inv_norm, threads)
    scaled = target * inv_norm[:, None, :]
    anchor_sums(mu, zt, inv_two_var, low, scaled, out, threads)


def warm_up(names) -> None:
    """Compile the kernels ``names`` by calling each on tiny inputs of the types that ``._kernel`` passes."""
    z = np.zeros((1, 2, 4), np.float32)
    low = np.zeros((1, 4), np.float32)
    calls = {
        "mean_offset_rect": lambda: mean_offset(z, z, np.float32(1), z.copy(), 1),
        "score_terms_rect": lambda: score_terms(
            z, z, z, np.zeros((1, 0), np.float32), np.float32(1), z.copy(), z.copy(), 1
        ),
        "endpoint_norms_rect": lambda: endpoint_norms(z, z, np.float32(1), low, low.copy(), 1),
        "anchor_sums_rect": lambda: anchor_sums(z, z, np.float32(1), low, z, z.copy(), 1),
    }
    for name in names:
        calls[name]()
