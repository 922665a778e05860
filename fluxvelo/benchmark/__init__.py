"""The velocity benchmark: the paper's datasets and simulations with ground truth, fluxvelo against scVelo and peers.

>>> import fluxvelo as fv
>>> result = fv.benchmark.run(["pancreas_2000", "simulation"], seeds=3, paper_epochs=1, out="results")
>>> print(result.table())

The same from the command line: ``fluxvelo benchmark --datasets pancreas_2000 simulation --out results``.
"""

from ._interface import Method, MethodNotAvailable
from ._methods import METHODS, register_method
from ._peers import external_method
from ._report import plot, write
from ._result import BenchmarkResult, to_markdown
from ._run import run
from ._simulation import ground_truth_scores, scvelo_simulation

__all__ = [
    "BenchmarkResult",
    "METHODS",
    "Method",
    "MethodNotAvailable",
    "external_method",
    "ground_truth_scores",
    "plot",
    "register_method",
    "run",
    "scvelo_simulation",
    "to_markdown",
    "write",
]
