"""Fit time and peak memory of a block of code (resident set size, this process and its children)."""

from __future__ import annotations

import os
import threading
import time

_MB = 1024.0**2


def _rss(procs) -> int:
    """Resident bytes of the given processes (those that ended count 0)."""
    import psutil

    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _tree(proc) -> list:
    """``proc`` and its live child processes (scanning for children reads all of /proc: do it rarely)."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _maxrss_bytes() -> int:
    import resource
    import sys

    unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) * unit


class Measure:
    """Context manager measuring wall time and peak resident memory (RSS) of the code inside.

    With :mod:`psutil`, a thread samples the RSS of this process plus all its child processes (e.g. the
    joblib workers of ``scvelo.tl.recover_dynamics(n_jobs=2)``, looked up every ``rescan`` seconds) every
    ``interval`` seconds;
    ``peak_mb`` is the highest sample and ``delta_mb`` its excess over the RSS at entry (what the fit
    added). Python's ``tracemalloc`` is not used: it misses torch's and NumPy's native allocations.
    Without psutil, ``getrusage`` high-water marks are used: the delta is then only the growth of the
    process's lifetime peak, a lower bound (0 when an earlier step peaked higher).

    Attributes
    ----------
    seconds
        Wall time.
    peak_mb, delta_mb
        Peak RSS during the block and its excess over the RSS at entry, in MiB.
    method
        ``'psutil_rss_sampling'`` or ``'getrusage_maxrss'``: what was measured.
    """

    def __init__(self, interval: float = 0.02, rescan: float = 1.0) -> None:
        self.interval = interval
        self.rescan = rescan
        self.seconds = float("nan")
        self.peak_mb = float("nan")
        self.delta_mb = float("nan")
        try:
            import psutil

            self._proc = psutil.Process(os.getpid())
            self.method = "psutil_rss_sampling"
        except ImportError:
            self._proc = None
            self.method = "getrusage_maxrss"

    def _sample(self) -> None:
        procs, scanned = _tree(self._proc), time.perf_counter()
        while not self._stop.wait(self.interval):
            if time.perf_counter() - scanned > self.rescan:  # pick up new worker processes
                procs, scanned = _tree(self._proc), time.perf_counter()
            self._peak = max(self._peak, _rss(procs))

    def __enter__(self) -> Measure:
        if self._proc is not None:
            self._start_rss = _rss(_tree(self._proc))
            self._peak = self._start_rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start_rss = _maxrss_bytes()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self._proc is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss(_tree(self._proc)))
            peak = self._peak
        else:
            peak = _maxrss_bytes()
        self.peak_mb = peak / _MB
        self.delta_mb = max(0.0, (peak - self._start_rss) / _MB)
