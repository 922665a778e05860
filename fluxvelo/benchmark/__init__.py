"""The velocity benchmark: the paper's datasets and simulations with ground truth, fluxvelo against scVelo.

>>> import fluxvelo as fv
>>> result = fv.benchmark.run(["pancreas_2000", "simulation"], seeds=3, paper_epochs=1, out="results")
>>> print(result.table())

The same from the command line: ``fluxvelo benchmark --datasets pancreas_2000 simulation --out results``.
"""

from ._methods import METHODS, Method
from ._report import plot, to_markdown, write
from ._run import BenchmarkResult, run
from ._simulation import ground_truth_scores, scvelo_simulation

__all__ = [
    "BenchmarkResult",
    "METHODS",
    "Method",
    "ground_truth_scores",
    "plot",
    "run",
    "scvelo_simulation",
    "to_markdown",
    "write",
]
