"""The velocity graph's and the embedding's numba kernels, in a module that imports only numpy and numba.

So that child processes can compile them into numba's cache alone (:func:`fluxvelo._jit.compile_in_children`):
a first call takes numpy's path while they compile, and the children finish even where the calling process
exits first (a script, the command line), so the next process finds the kernels cached.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# count trailing zeros of a power of two with a de Bruijn multiplication
_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)
_CTZ_TABLE = np.zeros(64, np.int64)
_CTZ_TABLE[[((1 << b) * int(_DEBRUIJN) % 2**64) >> 58 for b in range(64)]] = np.arange(64)


@njit(parallel=True, cache=True)
def hood(knn, n_recurse, first, counts, indptr, indices, count_only):  # pragma: no cover (compiled)
    # breadth-first search n_recurse levels deep from cells first, first + 1, ... (one per entry of counts),
    # in blocks of rows; each block owns a bitmap of visited cells, read back in order (sorted output
    # without a sort) when the visited span is small enough
    n, k = knn.shape
    n_rows = counts.size
    n_blocks = min(n_rows, 64)
    one = np.uint64(1)
    for b in prange(n_blocks):
        bits = np.zeros((n + 63) // 64, np.uint64)
        buf = np.empty(n, np.int64)
        for r in range(b * n_rows // n_blocks, (b + 1) * n_rows // n_blocks):
            i = first + r
            buf[0] = i
            bits[i >> 6] |= one << np.uint64(i & 63)
            size, lo, j_min, j_max = 1, 0, i, i
            for _ in range(n_recurse):
                hi = size
                for q in range(lo, hi):
                    for m in range(k):
                        j = knn[buf[q], m]
                        bit = one << np.uint64(j & 63)
                        if bits[j >> 6] & bit == 0:
                            bits[j >> 6] |= bit
                            buf[size] = j
                            size += 1
                            j_min, j_max = min(j_min, j), max(j_max, j)
                lo = hi
            if count_only:
                counts[r] = size
                for q in range(size):
                    bits[buf[q] >> 6] = 0
            elif (j_max >> 6) - (j_min >> 6) < 8 * size:
                pos = indptr[r]
                for w in range(j_min >> 6, (j_max >> 6) + 1):
                    word = bits[w]
                    while word != 0:
                        low = word & (~word + one)
                        indices[pos] = (w << 6) + _CTZ_TABLE[(low * _DEBRUIJN) >> np.uint64(58)]
                        pos += 1
                        word ^= low
                    bits[w] = 0
            else:
                indices[indptr[r] : indptr[r] + size] = np.sort(buf[:size])
                for q in range(size):
                    bits[buf[q] >> 6] = 0


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "arcp", "nsz"})
def pair_sums(X, V, first, indptr, indices, sqrt_transform, sums):  # pragma: no cover (compiled)
    # float32 like scVelo; the transform and the sums run in separate loops so both vectorise
    n_genes = X.shape[1]
    for r in prange(V.shape[0]):
        xi, vi = X[first + r], V[r]
        d = np.empty(n_genes, np.float32)
        for p in range(indptr[r], indptr[r + 1]):
            xj = X[indices[p]]
            for g in range(n_genes):
                d[g] = xj[g] - xi[g]
            if sqrt_transform:
                for g in range(n_genes):
                    d[g] = np.sign(d[g]) * np.sqrt(np.abs(d[g]))
            s1, s2, s3 = np.float32(0), np.float32(0), np.float32(0)
            for g in range(n_genes):
                s1 += d[g]
                s2 += d[g] * d[g]
                s3 += d[g] * vi[g]
            sums[0, p] += s1
            sums[1, p] += s2
            sums[2, p] += s3


@njit(cache=True, inline="always")
def _add_entry(t, mark, cols, m, i, j, w):  # pragma: no cover (compiled)
    # add w to entry j of row i in the dense scratch t, noting j in cols the first time; returns the entries so far
    if mark[j] != i:
        mark[j] = i
        t[j] = 0.0
        cols[m] = j
        m += 1
    t[j] += w
    return m


@njit(parallel=True, cache=True)
def project(pp, pi, pd, np_, ni, nd, has_neg, diag, X, scale, use_neg, out):  # pragma: no cover
    # one pass per row: merge positive/negative entries (dense scratch per block), normalise by the absolute
    # row sum incl. the self transition, then the mean-corrected expected unit displacement
    n, dim = X.shape
    n_blocks = min(n, 64)
    for b in prange(n_blocks):
        t = np.zeros(n)
        mark = np.full(n, -1, np.int64)
        cols = np.empty(n, np.int64)
        for i in range(b * n // n_blocks, (b + 1) * n // n_blocks):
            m = 0
            t_ii = np.expm1(scale * diag[i])
            for q in range(pp[i], pp[i + 1]):
                if pi[q] != i:
                    m = _add_entry(t, mark, cols, m, i, pi[q], np.expm1(scale * pd[q]))
            for q in range(np_[i], np_[i + 1]):
                w = -np.expm1(-scale * nd[q]) if use_neg else np.expm1(scale * nd[q])
                if ni[q] == i:
                    t_ii += w
                else:
                    m = _add_entry(t, mark, cols, m, i, ni[q], w)
            if has_neg and not use_neg:  # scVelo adds 1 to every stored entry
                if t_ii != 0:
                    t_ii += 1.0
                for q in range(m):
                    if t[cols[q]] != 0:
                        t[cols[q]] += 1.0
            z = abs(t_ii)
            for q in range(m):
                z += abs(t[cols[q]])
            for d in range(dim):
                out[i, d] = 0.0
            if z == 0:
                continue
            k, sp_ = 0, 0.0
            acc_p = np.zeros(dim)
            acc = np.zeros(dim)
            for q in range(m):
                j = cols[q]
                if t[j] == 0:
                    continue
                p = t[j] / z
                k += 1
                sp_ += p
                dn = 0.0
                for d in range(dim):
                    dn += (X[j, d] - X[i, d]) ** 2
                dn = np.sqrt(dn)
                if dn > 0:
                    for d in range(dim):
                        u = (X[j, d] - X[i, d]) / dn
                        acc_p[d] += p * u
                        acc[d] += u
            if k > 0:
                for d in range(dim):
                    out[i, d] = acc_p[d] - sp_ / k * acc[d]


def warm_up(names) -> None:
    """Compile the kernels ``names`` by calling them on tiny inputs of the argument types that their callers pass
    (float32 states and velocities, int64 pair indices; the stored graph's float32 values and int32 indices, a
    float64 embedding)."""
    i64, i32 = np.int64, np.int32
    if "hood" in names:
        knn, counts = np.array([[1], [0]], i64), np.empty(2, i64)
        hood(knn, 1, 0, counts, counts, np.empty(0, i64), True)
    if "pair_sums" in names:
        x = np.zeros((2, 2), np.float32)
        pair_sums(x, x, 0, np.array([0, 1, 2], i64), np.array([1, 0], i64), False, np.zeros((3, 2), np.float32))
    if "project" in names:
        ptr, idx, data, emb = np.zeros(3, i32), np.empty(0, i32), np.empty(0, np.float32), np.zeros((2, 2))
        project(ptr, idx, data, ptr, idx, data, False, np.zeros(2), emb, 1.0, True, np.empty_like(emb))
