"""Fused numba CPU kernels for 2-D blocks: the quantities of :mod:`._kernel`, in a few vectorised passes.

The torch path builds each ``[G, N, B]`` kernel in memory and walks it some ten times (distances, softmax,
products). Here a tile of :data:`TILE` queries walks the samples of its block once per pass while they sit in L1:
the smallest distance, then the shifted exponential and the weighted moments. The queries are the vector lanes,
so every sum is a lane's own and no pass ends in a reduction across lanes; with the samples as the lanes, each
query's four such reductions over 64 samples made each kernel 2.1 to 3.1 times slower in a fit. Each lane's
running values live in one small scratch array (``lanes``), indexed with constant rows. The exponential is a
vectorisable polynomial (relative error 1e-7 near 0, growing like the float32 argument's own rounding, 1e-7 |t|),
because a scalar ``exp`` call per kernel entry would cost more than the whole torch path.

All kernels take and fill float32 arrays laid out ``[G, 2, N]``. Each is a serial loop over one rectangle of
the work, blocks ``g0:g1`` by queries ``n0:n1``, that releases the GIL; :func:`_run` runs it over the rectangles
of :func:`tasks` on a few Python threads that share one queue. numba's own parallel loops (``prange``) did this
before, at two costs: their compile (about 7 s of the 10 to 13 s that the first fit after installation spent
compiling; ``benchmarks/compile_time.py``), and a thread pool that spins while it waits, which took the core of
any neighbouring process. Blocks of other sizes go to torch (``_kernel.serves_fused``).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# exp(t) = 2^k 2^f with k = round(t log2 e) and |f| <= 1/2; 2^f by a degree-6 polynomial fitted at Chebyshev
# nodes. Below 2^CUT_EXPONENT (about 8e-25) the result is exactly 0: the weights are shifted so that the largest
# is 1, so no normalised weight can tell the difference, and tiny weights would make their products subnormal,
# which x86 computes about a hundred times slower (the kernels ran 12x slower at the paper's sigma2 = 1e-3).
_NODES = 0.5 * np.cos(np.pi * (np.arange(64) + 0.5) / 64)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (np.float32(c) for c in np.polynomial.polynomial.polyfit(_NODES, 2.0**_NODES, 6))
_LOG2E = np.float32(np.log2(np.e))
EXP_FLOOR = np.float32(-87.0)
CUT_EXPONENT = -80
#: Queries per tile: the lanes of the vector loops (two AVX-512 registers of float32). 16 lanes ran 2.2 times slower.
TILE = 32
# Rows of a tile's per-query scratch ``lanes [N_ROWS, TILE]``: the query, the smallest squared distance, the weight
# sum, the weighted offsets, and score_terms_rect's weighted mean, direction and moments, per dimension.
Q0, Q1, LOW, TOTAL, SUM0, SUM1, M0, M1, V0, V1, COV0, COV1, THIRD0, THIRD1, TURN0, TURN1 = range(16)
N_ROWS = 16
#: Rectangles per thread that :func:`tasks` cuts the work into, so that a thread another process slows is helped out.
TASKS_PER_THREAD = 4

# The pool of helper threads that :func:`_run` shares out the rectangles to, and its size.
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bits are the int32 ``bits`` (a bit cast, which vectorises)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(fastmath=True, cache=True, inline="always")
def _exp(t: np.float32) -> np.float32:
    """``exp(t)`` for ``t <= 0``: ``2^k p(f)``, with ``2^k`` built in the exponent field; 0 below ``2^CUT_EXPONENT``."""
    y = max(t, EXP_FLOOR) * _LOG2E
    k = np.floor(y + np.float32(0.5))
    f = y - k
    p = _C6 * f + _C5
    p = p * f + _C4
    p = p * f + _C3
    p = p * f + _C2
    p = p * f + _C1
    p = p * f + _C0
    k_int = np.int32(k)
    return p * _float_from_bits(np.int32((k_int + 127) << 23)) if k_int >= CUT_EXPONENT else np.float32(0)


@njit(fastmath=True, cache=True, inline="always")
def _start_tile(q: np.ndarray, g: int, t0: int, n1: int, lanes: np.ndarray) -> int:
    """Load the queries ``q[g, :, t0:t0 + TILE]`` into ``lanes[Q0]``, ``lanes[Q1]`` (past ``n1``: copies of the
    first, whose results are dropped), and clear the sums; returns how many lanes hold real queries."""
    for j in range(TILE):
        n = t0 + j if t0 + j < n1 else t0
        lanes[Q0, j] = q[g, 0, n]
        lanes[Q1, j] = q[g, 1, n]
        lanes[LOW, j] = np.inf
        lanes[TOTAL, j] = 0
        lanes[SUM0, j] = 0
        lanes[SUM1, j] = 0
    return min(TILE, n1 - t0)


@njit(fastmath=True, cache=True, inline="always")
def _tile_moments(x: np.ndarray, g: int, inv_two_var: np.float32, lanes: np.ndarray, weights: np.ndarray) -> None:
    """Per query of the tile, over the samples ``x[g]``: the smallest squared distance (``LOW``), the weights
    ``w_b = exp(-(|x_b - q|^2 - LOW) / (2 var))`` into ``weights[b]``, their sum (``TOTAL``) and the weighted
    offsets ``sum_b w_b (x_b - q)`` (``SUM0``, ``SUM1``). Distances are formed twice: cheaper than storing them."""
    n_samples = x.shape[2]
    for b in range(n_samples):
        x0, x1 = x[g, 0, b], x[g, 1, b]
        for j in range(TILE):
            r0, r1 = x0 - lanes[Q0, j], x1 - lanes[Q1, j]
            lanes[LOW, j] = min(lanes[LOW, j], r0 * r0 + r1 * r1)
    for b in range(n_samples):
        x0, x1 = x[g, 0, b], x[g, 1, b]
        for j in range(TILE):
            r0, r1 = x0 - lanes[Q0, j], x1 - lanes[Q1, j]
            w = _exp((lanes[LOW, j] - (r0 * r0 + r1 * r1)) * inv_two_var)
            weights[b, j] = w
            lanes[TOTAL, j] += w
            lanes[SUM0, j] += w * r0
            lanes[SUM1, j] += w * r1


@njit(fastmath=True, cache=True, nogil=True)
def moments_rect(
    q: np.ndarray, x: np.ndarray, inv_two_var: np.float32, offset: np.ndarray, low: np.ndarray, inv_norm: np.ndarray,
    g0: int, g1: int, n0: int, n1: int,
) -> None:  # fmt: skip
    """Per query of ``q [G, 2, N]`` over the samples ``x [G, 2, B]``: the kernel-weighted mean minus the query,
    ``offset = m(q) - q``; the nearest sample's squared distance ``low [G, N]``; and the inverse of the softmax
    normaliser, ``inv_norm [G, N]``. The rollout uses the first, :func:`pull_back` the other two."""
    lanes, weights = np.empty((N_ROWS, TILE), np.float32), np.empty((x.shape[2], TILE), np.float32)
    for g in range(g0, g1):
        for t0 in range(n0, n1, TILE):
            m = _start_tile(q, g, t0, n1, lanes)
            _tile_moments(x, g, inv_two_var, lanes, weights)
            for j in range(m):
                offset[g, 0, t0 + j] = lanes[SUM0, j] / lanes[TOTAL, j]
                offset[g, 1, t0 + j] = lanes[SUM1, j] / lanes[TOTAL, j]
                low[g, t0 + j] = lanes[LOW, j]
                inv_norm[g, t0 + j] = 1 / lanes[TOTAL, j]


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
    n_samples = x.shape[2]
    has_turnover = turnover.shape[1] > 0
    lanes, weights = np.empty((N_ROWS, TILE), np.float32), np.empty((n_samples, TILE), np.float32)
    for g in range(g0, g1):
        tg = g if turnover.shape[0] > 1 else 0
        for t0 in range(n0, n1, TILE):
            m = _start_tile(z, g, t0, n1, lanes)
            _tile_moments(x, g, np.float32(0.5) / sigma2, lanes, weights)
            for j in range(TILE):
                n = t0 + j if j < m else t0
                for k in range(2):
                    offset = lanes[SUM0 + k, j] / lanes[TOTAL, j]
                    lanes[M0 + k, j] = lanes[Q0 + k, j] + offset
                    lanes[V0 + k, j] = f[g, k, n] - 2 * offset / sigma2
                    lanes[COV0 + k, j] = 0
                    lanes[THIRD0 + k, j] = 0
                    lanes[TURN0 + k, j] = 0
                    if j < m:
                        s_out[g, k, n] = offset / sigma2
            # y_b from differences to keep float32 accurate
            for b in range(n_samples):
                x0, x1 = x[g, 0, b], x[g, 1, b]
                gb = turnover[tg, b] if has_turnover else np.float32(0)
                for j in range(TILE):
                    y0, y1 = x0 - lanes[M0, j], x1 - lanes[M1, j]
                    w = weights[b, j]
                    wyv = w * (y0 * lanes[V0, j] + y1 * lanes[V1, j])
                    wy2 = w * (y0 * y0 + y1 * y1)
                    lanes[COV0, j] += wyv * y0
                    lanes[COV1, j] += wyv * y1
                    lanes[THIRD0, j] += wy2 * y0
                    lanes[THIRD1, j] += wy2 * y1
                    lanes[TURN0, j] += w * gb * y0
                    lanes[TURN1, j] += w * gb * y1
            for j in range(m):
                total = lanes[TOTAL, j]
                for k in range(2):
                    cov_v, third, cov_g = lanes[COV0 + k, j], lanes[THIRD0 + k, j], lanes[TURN0 + k, j]
                    t_out[g, k, t0 + j] = (
                        cov_v / total / sigma2**2 - lanes[V0 + k, j] / sigma2 - third / total / sigma2**3
                        - cov_g / total / sigma2
                    )  # fmt: skip


@njit(fastmath=True, cache=True, nogil=True)
def anchor_sums_rect(
    mu: np.ndarray, zt: np.ndarray, inv_two_var: np.float32, low: np.ndarray, scaled: np.ndarray, out: np.ndarray,
    g0: int, g1: int, a0: int, a1: int,
) -> None:  # fmt: skip
    """:func:`pull_back`'s second pass: per anchor ``a``, ``out = sum_j W_aj target_j``, with ``scaled`` the
    targets times their endpoints' inverse normalisers and ``low`` their nearest-anchor distances."""
    lanes = np.empty((N_ROWS, TILE), np.float32)
    for g in range(g0, g1):
        for t0 in range(a0, a1, TILE):
            m = _start_tile(mu, g, t0, a1, lanes)
            for e in range(zt.shape[2]):
                z0, z1, shift = zt[g, 0, e], zt[g, 1, e], low[g, e]
                target0, target1 = scaled[g, 0, e], scaled[g, 1, e]
                # shifted by each endpoint's own nearest anchor, so every exponent is <= 0
                for j in range(TILE):
                    r0, r1 = z0 - lanes[Q0, j], z1 - lanes[Q1, j]
                    w = _exp((shift - (r0 * r0 + r1 * r1)) * inv_two_var)
                    lanes[SUM0, j] += w * target0
                    lanes[SUM1, j] += w * target1
            for j in range(m):
                out[g, 0, t0 + j] = lanes[SUM0, j]
                out[g, 1, t0 + j] = lanes[SUM1, j]


def tasks(n_blocks: int, n_items: int, threads: int) -> tuple[tuple[int, int, int, int], ...]:
    """Rectangles ``(g0, g1, n0, n1)`` that tile ``n_blocks x n_items``, about :data:`TASKS_PER_THREAD` per thread:
    runs of whole blocks, or pieces of each block's items, whole tiles each, where the blocks are fewer than the tasks
    (cached: a small call would otherwise spend a fifth of its time here)."""
    return _tasks(n_blocks, n_items, TASKS_PER_THREAD * threads)


@functools.lru_cache(maxsize=64)
def _tasks(n_blocks: int, n_items: int, n_tasks: int) -> tuple[tuple[int, int, int, int], ...]:
    if n_blocks >= n_tasks:
        edges = np.linspace(0, n_blocks, n_tasks + 1).astype(np.int64).tolist()
        return tuple((a, b, 0, n_items) for a, b in zip(edges[:-1], edges[1:]) if b > a)
    # pieces of whole tiles, so that no tile but a block's last runs part empty
    tiles = -(-n_items // TILE)
    edges = np.linspace(0, tiles, min(tiles, -(-n_tasks // n_blocks)) + 1).round() * TILE
    edges = np.minimum(edges, n_items).astype(np.int64).tolist()
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


def moments(
    q: np.ndarray, x: np.ndarray, inv_two_var: np.float32, offset: np.ndarray, low: np.ndarray, inv_norm: np.ndarray,
    threads: int,
) -> None:  # fmt: skip
    """:func:`moments_rect` over blocks by queries, on ``threads`` threads."""
    _run(moments_rect, (q, x, inv_two_var, offset, low, inv_norm), q.shape[0], q.shape[2], threads)


def mean_offset(z: np.ndarray, x: np.ndarray, inv_two_var: np.float32, out: np.ndarray, threads: int) -> None:
    """``out = m(z) - z``, the kernel-weighted mean of the samples ``x`` minus each query ``z``."""
    moments(z, x, inv_two_var, out, *np.empty((2, z.shape[0], z.shape[2]), np.float32), threads)


def score_terms(
    z: np.ndarray, x: np.ndarray, f: np.ndarray, turnover: np.ndarray, sigma2: np.float32, s_out: np.ndarray,
    t_out: np.ndarray, threads: int,
) -> None:  # fmt: skip
    """:func:`score_terms_rect` over blocks by queries, on ``threads`` threads."""
    _run(score_terms_rect, (z, x, f, turnover, sigma2, s_out, t_out), z.shape[0], z.shape[2], threads)


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
    normaliser (:func:`moments` over the anchors), then per anchor ``i`` the sum over endpoints (:func:`anchor_sums`).
    """
    low, inv_norm = np.empty((2, zt.shape[0], zt.shape[2]), np.float32)
    moments(zt, mu, inv_two_var, np.empty_like(zt), low, inv_norm, threads)
    scaled = target * inv_norm[:, None, :]
    anchor_sums(mu, zt, inv_two_var, low, scaled, out, threads)


def warm_up(names) -> None:
    """Compile the kernels ``names`` by calling each on tiny inputs of the types that ``._kernel`` passes."""
    z = np.zeros((1, 2, 4), np.float32)
    low = np.zeros((1, 4), np.float32)
    calls = {
        "moments_rect": lambda: mean_offset(z, z, np.float32(1), z.copy(), 1),
        "score_terms_rect": lambda: score_terms(
            z, z, z, np.zeros((1, 0), np.float32), np.float32(1), z.copy(), z.copy(), 1
        ),
        "anchor_sums_rect": lambda: anchor_sums(z, z, np.float32(1), low, z, z.copy(), 1),
    }
    for name in names:
        calls[name]()
