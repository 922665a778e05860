"""fluxvelo: RNA velocity with Flux Matching.

>>> import fluxvelo as fv
>>> fv.tl.velocity(adata)

The subpackages (``fv.pp``, ``fv.tl``, ``fv.pl``, ...) are imported on first access, so that ``import fluxvelo``
and ``fluxvelo --help`` do not pay for torch, scanpy and numba until a subpackage is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from ._settings import settings

_SUBPACKAGES = ("benchmark", "datasets", "fields", "flux", "gen", "metrics", "pl", "pp", "tl")

__all__ = [*_SUBPACKAGES, "settings", "__version__"]

if TYPE_CHECKING:
    from . import benchmark, datasets, fields, flux, gen, metrics, pl, pp, tl


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
