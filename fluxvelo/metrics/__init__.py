"""Benchmark metrics on the kNN graph: cross-boundary correctness, consistency, in-cluster coherence."""

from ._cbc import cross_boundary_correctness
from ._coherence import in_cluster_coherence
from ._consistency import consistency

__all__ = ["consistency", "cross_boundary_correctness", "in_cluster_coherence"]
