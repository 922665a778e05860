"""The interface every benchmark method implements: prepared AnnData and a seed in, velocity layers out.

``fit(adata, seed, options) -> settings`` gets a copy of the prepared AnnData (its ``uns['benchmark']`` names
the dataset, its cluster key and its embedding) and a seed. It writes ``layers['velocity']`` over all genes
(NaN for the genes it has no velocity for) and ``var['velocity_genes']`` in place, and returns the settings it
actually used, every deviation from the method's default included. The harness times the call and measures
its memory. A method that cannot run here raises :class:`MethodNotAvailable` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from anndata import AnnData

#: Key of ``uns`` on the copy a method gets: ``{'dataset', 'cluster_key', 'basis'}``.
DATASET_KEY = "benchmark"


class MethodNotAvailable(RuntimeError):
    """The method cannot run here: its package is not installed, or its environment is missing or broken.

    The message is the reason; the benchmark reports it in a row with status ``'method not available'``.
    """


@dataclass(frozen=True)
class Method:
    """A velocity method of the benchmark.

    Attributes
    ----------
    name
        Name used on the command line and in the tables.
    description
        One line for the report.
    fit
        ``fit(adata, seed, options) -> settings``: writes ``layers['velocity']`` (and ``var['velocity_genes']``)
        in place and returns the settings that were actually used. May raise :class:`MethodNotAvailable`.
        A returned ``'fit_time_s'`` (the method's own fit, measured inside a separate process) replaces the
        harness's wall time in the table; the wall time is then kept in the settings.
    deterministic
        The result does not depend on the seed, so one run stands for all seeds.
    needs
        Python package the method imports in this process, or None. Checked before the fit.
    extra
        The pip extra of fluxvelo that installs ``needs`` (``pip install "fluxvelo[extra]"``), or None.
    external
        The method can run in a separate Python environment (``peer_python`` of :func:`fluxvelo.benchmark.run`,
        ``--peer-python NAME=PATH`` on the command line).
    """

    name: str
    description: str
    fit: Callable[[AnnData, int, dict[str, Any]], dict[str, Any]]
    deterministic: bool = False
    needs: str | None = None
    extra: str | None = None
    external: bool = False
