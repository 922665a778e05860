"""fluxvelo: RNA velocity with Flux Matching.

>>> import fluxvelo as fv
>>> fv.tl.velocity(adata)
"""

__version__ = "0.1.0"

from ._settings import settings
from . import benchmark, datasets, fields, flux, gen, metrics, pl, pp, tl

__all__ = ["benchmark", "datasets", "fields", "flux", "gen", "metrics", "pl", "pp", "settings", "tl", "__version__"]
