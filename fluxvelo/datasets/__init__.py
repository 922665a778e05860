"""Datasets: the registry of real data (url, sha256, cluster key, embedding, lineage edges), loaders, and a
simulator with ground-truth velocities.

>>> import fluxvelo as fv
>>> adata = fv.datasets.simulation(n_cells=1000, n_genes=100)
>>> fv.datasets.info("pancreas").edges[0]
('Ductal', 'Ngn3 low EP')
"""

from ._load import (
    bonemarrow,
    dentategyrus,
    file_sha256,
    gastrulation_erythroid,
    hindbrain,
    load,
    pancreas,
    pancreas_2000,
    resolve,
)
from ._registry import DatasetInfo, available, info, registry_path
from ._simulation import simulation

__all__ = [
    "DatasetInfo",
    "available",
    "bonemarrow",
    "dentategyrus",
    "file_sha256",
    "gastrulation_erythroid",
    "hindbrain",
    "info",
    "load",
    "pancreas",
    "pancreas_2000",
    "registry_path",
    "resolve",
    "simulation",
]
