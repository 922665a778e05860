"""A cell order that keeps neighbours close in memory, for the products that gather each cell's neighbours.

The moments and the velocity graph read, for every cell, the rows of its kNN neighbours from a cells x genes
block. In the data's own order those rows lie anywhere in the block; once the block outgrows the caches (a few
hundred thousand cells), nearly every read goes to main memory. Renumbering the cells by reverse
Cuthill-McKee on the neighbour graph puts most neighbours within a few thousand rows of each other. The
products then run on renumbered copies, and results go back to the data's order. Every row's sum keeps its
entries in their original order, so the results are the same to the bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

#: Fewer cells than this fit in the caches anyway: no renumbering.
MIN_CELLS = 1 << 15


def locality_order(pattern: sparse.spmatrix) -> np.ndarray | None:
    """Reverse Cuthill-McKee order of the (symmetrised) graph ``pattern``, or None below :data:`MIN_CELLS`."""
    if pattern.shape[0] < MIN_CELLS:
        return None
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    return reverse_cuthill_mckee(sparse.csr_matrix(pattern), symmetric_mode=False).astype(np.int64)


def renumber(matrix: sparse.csr_matrix, order: np.ndarray) -> sparse.csr_matrix:
    """``P M P^T`` for the order ``order``: row ``k`` is row ``order[k]`` of ``matrix``, its columns renumbered.

    Each row keeps its entries in their original order (its indices are not sorted).
    """
    matrix = sparse.csr_matrix(matrix)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    counts = np.diff(matrix.indptr)[order]
    indptr = np.concatenate(([0], np.cumsum(counts)))
    source = np.repeat(matrix.indptr[:-1][order] - indptr[:-1], counts) + np.arange(indptr[-1])
    indices = inverse[matrix.indices[source]].astype(matrix.indices.dtype)
    return sparse.csr_matrix((matrix.data[source], indices, indptr.astype(matrix.indptr.dtype)), shape=matrix.shape)


def restore_rows(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (in the order ``order``) back in the data's order."""
    out = np.empty_like(x)
    out[order] = x
    return out


class Smoother:
    """``weights @ x`` for blocks ``x`` of all cells, computed on cells renumbered by :func:`locality_order`."""

    def __init__(self, weights: sparse.csr_matrix) -> None:
        self.order = locality_order(weights)
        self.weights = weights if self.order is None else renumber(weights, self.order)

    def __call__(self, x: Any) -> np.ndarray:
        """The dense product for a dense or sparse (CSR) ``x``."""
        if self.order is None:
            return _dense_product(self.weights, x)
        return restore_rows(_dense_product(self.weights, x[self.order]), self.order)


def _dense_product(weights: sparse.csr_matrix, x: Any) -> np.ndarray:
    out = weights @ x
    return out.toarray() if sparse.issparse(out) else np.asarray(out)
