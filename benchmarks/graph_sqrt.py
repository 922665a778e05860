"""Does the default fit's velocity graph gain from scVelo's square-root transform? Decided on simulations.

For both benchmark simulators (this repository's and scVelo's), 3 seeds of the default fit, the pooled CBC on
the true edges with the graph built on the velocities as they are and on their signed square roots.

Usage::

    python benchmarks/graph_sqrt.py
"""

from __future__ import annotations

import fluxvelo as fv
from fluxvelo.benchmark._datasets import prepare

fv.settings.progress_bar = False
fv.settings.verbosity = "warning"
for name in ("simulation", "scvelo_simulation"):
    prepared = prepare(name, download=False)
    for seed in (0, 1, 2):
        adata = prepared.adata.copy()
        fv.tl.velocity(adata, random_state=seed)
        cbc = {}
        for sqrt in (False, True):
            fv.tl.velocity_graph(adata, sqrt_transform=sqrt)
            fv.tl.velocity_embedding(adata, basis=prepared.basis)
            cbc[sqrt], _ = fv.metrics.cross_boundary_correctness(
                adata, cluster_key=prepared.cluster_key, edges=prepared.edges
            )
        print(f"{name:18s} seed {seed}: CBC on the true edges {cbc[False]:.4f} as is, {cbc[True]:.4f} square-rooted")
