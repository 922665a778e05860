"""The cells' states on the leading axes that the fitted genes share: where the fitted field is read.

The smoothed ``(u, s)`` of a cell still carry each gene's own noise. The lineage moves all genes together, along
a few shared axes, so the projection of every cell's standardised ``(u, s)`` of all fitted genes onto the leading
principal axes keeps the lineage and drops most of that noise. The field is fitted on the smoothed data as given
and read at the projected states (``fv.tl.velocity(state_rank=...)``; docs/diagnosis.md, "Shared states").
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Principal axes kept by the default preset: the best of 10, 20, 30, 50 and 100 on each of three simulators,
#: three data sets each (``benchmarks/state_rank.py``; docs/diagnosis.md, "Shared states").
STATE_RANK = 20
#: Where fewer genes are fitted, at most this many axes per fitted gene (a quarter of the ``2 x genes`` columns):
#: the best of 0.3, 0.5 and 0.8 on the three simulators at 15 to 100 genes, three data sets each
#: (``benchmarks/state_rank_genes.py``; docs/diagnosis.md, "Few genes: fewer axes").
AXES_PER_GENE = 0.5
#: Extra random directions and power iterations of the randomised range finder.
OVERSAMPLE = 10
POWER_ITERATIONS = 3


def default_rank(n_genes: int) -> int:
    """The axes that ``state_rank='auto'`` keeps for ``n_genes`` fitted genes: :data:`STATE_RANK`, or
    :data:`AXES_PER_GENE` per gene (rounded up) where that is fewer."""
    return max(1, min(STATE_RANK, math.ceil(AXES_PER_GENE * n_genes)))


def low_rank_states(blocks: torch.Tensor, rank: int, rng: np.random.Generator) -> torch.Tensor:
    """Project every cell's scaled states onto the ``rank`` leading principal axes of all genes' ``u`` and ``s``.

    Parameters
    ----------
    blocks
        Scaled ``(u, s)`` laid out ``[genes, cells, 2]``, on the device where the projection runs.
    rank
        Principal axes kept. At or above the matrix's own rank the states come back unchanged.
    rng
        Draws the test directions of the randomised range finder that finds the axes (Halko, Martinsson and
        Tropp, 2011; :data:`POWER_ITERATIONS` power iterations). Where the singular values fall slowly past
        ``rank`` the axes found are a good ``rank``-dimensional subspace rather than exactly the leading one: on
        pancreas (1,126 genes) the projection differs from the exact truncated SVD's by 13% of what the
        projection removes, and numpy's full SVD took 37 s against 2.6 s (ad hoc, 2 cores, beside another job).

    Returns
    -------
    The projected states, laid out as ``blocks`` (float32, a new tensor). Each column (a gene's ``u`` or ``s``) is
    standardised over the cells before the projection and returned to its own units after it.
    """
    n_genes, n_cells, _ = blocks.shape
    if rank >= min(n_cells, 2 * n_genes):
        return blocks.to(torch.float32, copy=True)
    # cells x (u_0, s_0, u_1, ...) in float32, standardised in place: besides the result, the one copy made
    z = blocks.permute(1, 0, 2).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    z = z.reshape(n_cells, -1)
    var, mean = torch.var_mean(z, dim=0, correction=0)
    scale = var.sqrt()
    scale[scale == 0] = 1.0
    z.sub_(mean).div_(scale)
    y = z @ torch.from_numpy(rng.standard_normal((z.shape[1], rank + OVERSAMPLE))).to(z)
    for _ in range(POWER_ITERATIONS):
        y = z @ (z.T @ torch.linalg.qr(y).Q)
    axes = torch.linalg.svd(torch.linalg.qr(y).Q.T @ z, full_matrices=False).Vh[:rank]
    scores = z @ axes.T
    del z
    projected = (scores @ axes).mul_(scale).add_(mean)
    return projected.reshape(n_cells, n_genes, 2).permute(1, 0, 2).contiguous()
