"""Package-wide settings (verbosity, default device, progress bars, dataset cache)."""

from __future__ import annotations

import logging
import operator
import os
import tempfile
from pathlib import Path

logger = logging.getLogger("fluxvelo")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False


class Settings:
    """Settings of fluxvelo, reachable as ``fluxvelo.settings``.

    Attributes
    ----------
    verbosity
        Logging level of the ``'fluxvelo'`` logger: an int or a name such as ``'info'`` or ``'warning'``.
    device
        Default device for fits: ``'auto'`` (CUDA when available, else CPU), ``'cpu'``, ``'cuda'``, ``'cuda:1'``.
    progress_bar
        Show tqdm progress bars during fits (only where stderr is a terminal, so that log files stay clean).
    n_jobs
        CPU threads of fits and of the velocity graph, shared by torch and numba, following scanpy's convention:
        a positive count, or -1 for every core this process may use (-2: all but one, ...). The default, None,
        decides per call: one thread for small work, else the cores that other processes leave free, looked at
        again every few steps so that a fit backs off when a neighbour gets busy.
    fused_kernels
        On the CPU, compute the kernel moments of small float32 blocks (velocity's 2-D genes, toy data) with
        fused numba loops, several times faster than torch's; False uses the torch code everywhere.
    cache_dir
        Where downloaded datasets are kept. Defaults to ``$FLUXVELO_CACHE_DIR`` or ``~/.cache/fluxvelo``.
    data_dir
        Extra folder searched for dataset files before any download, e.g. ``../shared/data``.
        Defaults to ``$FLUXVELO_DATA_DIR``.
    """

    def __init__(self) -> None:
        self.verbosity = os.environ.get("FLUXVELO_VERBOSITY", "info")
        self.device = "auto"
        self.progress_bar = True
        self.n_jobs = None
        self.fused_kernels = True
        self._cache_dir = None
        self._data_dir = None

    @property
    def verbosity(self) -> int:
        return logger.level

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        level = logging.getLevelName(value.upper()) if isinstance(value, str) else int(value)
        if not isinstance(level, int):
            raise ValueError(f"Unknown verbosity {value!r}; use 'debug', 'info', 'warning' or 'error'.")
        logger.setLevel(level)

    @property
    def n_jobs(self) -> int | None:
        return self._n_jobs

    @n_jobs.setter
    def n_jobs(self, value: int | None) -> None:
        if value is not None:
            try:
                value = operator.index(value)
            except TypeError:
                value = 0
            if value == 0:
                raise ValueError("n_jobs must be None, a positive count, or -1 for all cores (-2: all but one, ...).")
        self._n_jobs = value

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is not None:
            return self._cache_dir
        env = os.environ.get("FLUXVELO_CACHE_DIR")
        if env:
            return Path(env)
        home = Path.home() / ".cache" / "fluxvelo"
        return home if os.access(home.parent if home.parent.exists() else Path.home(), os.W_OK) else Path(tempfile.gettempdir()) / "fluxvelo"

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike | None) -> None:
        self._cache_dir = None if value is None else Path(value)

    @property
    def data_dir(self) -> Path | None:
        if self._data_dir is not None:
            return self._data_dir
        env = os.environ.get("FLUXVELO_DATA_DIR")
        return Path(env) if env else None

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike | None) -> None:
        self._data_dir = None if value is None else Path(value)

    def __repr__(self) -> str:
        return (
            f"fluxvelo.settings(verbosity={logging.getLevelName(self.verbosity)!r}, device={self.device!r}, "
            f"progress_bar={self.progress_bar}, n_jobs={self.n_jobs}, cache_dir='{self.cache_dir}', data_dir={self.data_dir!r})"
        )


settings = Settings()
