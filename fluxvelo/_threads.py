"""CPU threads for a fit: how many, from the work's size and the cores that are free now.

Torch's and numba's thread pools both spin while they wait at a barrier. When either runs more threads than
there are free cores (a busy laptop, a shared node), every barrier waits for a thread that the kernel has
descheduled, and a fit slows several-fold. So a fit decides one thread count from ``settings.n_jobs``, the size
of its work and the cores that are free, and looks again every few steps. Where the fused CPU kernels do the
fit's heavy work, they run on that many threads of their own (which sleep, not spin, while they wait), and torch,
left with the small ops around them, on one. numpy's BLAS follows the same count, and the work that reads the
fitted field after the fit keeps the fit's last count: on two threads beside a busy neighbour, each of those steps
took two to three times as long.

Free cores are the cores this process may run on (``os.sched_getaffinity``, capped by a cgroup CPU quota)
minus the load that other processes put on them: busy time from ``/proc/stat`` minus this process's own CPU
time, over the last interval. Where ``/proc/stat`` is missing, ``os.getloadavg`` stands in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("fluxvelo")

# Below this many kernel entries per step (blocks x batch^2), one thread beats several: the ops are too small
# for a second thread to pay for its barriers.
SINGLE_THREAD_WORK = 1 << 21
# Seconds over which the first look at the machine's load is taken.
FIRST_SAMPLE_S = 0.05
# A core counts as free when others leave at least this much of it idle.
FREE_FRACTION = 0.6


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _affine_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_seconds(cpus: set[int] | None) -> float | None:
    """Busy time summed over ``cpus`` (all when None) since boot, from ``/proc/stat``; None where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        busy += sum(values) - values[3] - values[4]  # all but idle and iowait
    return busy / tick


class LoadProbe:
    """The load that other processes put on this process's cores, measured between two calls of :meth:`others`."""

    def __init__(self) -> None:
        self.cores = usable_cores()
        self._cpus = _affine_cpus()
        self._mark()

    @classmethod
    def sampled(cls) -> LoadProbe:
        """A probe that has watched the machine for :data:`FIRST_SAMPLE_S` already (at once on one core)."""
        probe = cls()
        if probe.cores > 1:
            time.sleep(FIRST_SAMPLE_S)
        return probe

    def _mark(self) -> None:
        self._wall = time.perf_counter()
        self._own = time.process_time()
        self._busy = _busy_seconds(self._cpus)

    def others(self) -> float:
        """Cores kept busy by other processes since the last call (or since the probe was made)."""
        wall, own, busy = self._wall, self._own, self._busy
        self._mark()
        elapsed = self._wall - wall
        if busy is None or self._busy is None or elapsed <= 0:
            try:
                return max(0.0, os.getloadavg()[0] - 1.0)  # the load average counts this process too
            except OSError:
                return 0.0
        return max(0.0, (self._busy - busy - (self._own - own)) / elapsed)

    def free_cores(self) -> int:
        """Cores that others leave at least :data:`FREE_FRACTION` idle, at least one."""
        return max(1, min(self.cores, math.floor(self.cores - self.others() + (1 - FREE_FRACTION))))


def resolve_n_jobs(n_jobs: int | None) -> int | None:
    """scanpy's convention: a positive count, or -1 for every usable core (-2 for all but one, ...).

    None (the default) means that each fit decides from its work and the free cores.
    """
    if n_jobs is None:
        return None
    n_jobs = int(n_jobs)
    if n_jobs == 0:
        raise ValueError("n_jobs must be a positive count, a negative count from all cores (-1: all), or None.")
    cores = usable_cores()
    return max(1, min(cores, n_jobs) if n_jobs > 0 else cores + 1 + n_jobs)


# The fit's fused CPU kernels' thread count while a fit holds it (see cpu_threads); None: torch's count.
_kernel_threads: int | None = None


def kernel_threads() -> int:
    """Threads for the fit's fused CPU kernels (``fluxvelo.flux._kernel_cpu``): the running fit's, else torch's."""
    import torch

    return _kernel_threads or torch.get_num_threads()


def set_threads(n: int, *, fused: bool = False) -> None:
    """Use ``n`` threads in torch, in the fused CPU kernels and, when loaded, numba (numba's setting is per calling
    thread). ``fused``: the fused kernels do the heavy work, and torch, left with the small ops around them, gets one
    thread, so that its idle OpenMP workers do not spin on the cores that the kernels' threads need."""
    import torch

    global _kernel_threads
    if torch.get_num_threads() != (1 if fused else n):
        torch.set_num_threads(1 if fused else n)
    _kernel_threads = n
    numba = _numba()
    if numba is not None:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _numba():
    try:
        import numba
    except ImportError:  # the fused kernels and the graph's loops fall back to torch and numpy
        return None
    return numba


class ThreadPlan:
    """The thread count of one fit: fixed by ``settings.n_jobs``, else from its work and the free cores.

    Call :meth:`update` every few steps: the count follows the load that other processes put on the cores.
    """

    def __init__(self, work: int, n_jobs: int | None, *, fused: bool = False) -> None:
        self.fused = fused
        self.fixed = resolve_n_jobs(n_jobs)
        self.small = work < SINGLE_THREAD_WORK
        self.probe = None if self.fixed is not None or self.small else LoadProbe.sampled()
        self.threads = self._decide()

    def _decide(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.small or self.probe is None or self.probe.cores == 1:
            return 1
        return self.probe.free_cores()

    def update(self) -> None:
        threads = self._decide()
        if threads != self.threads:
            logger.debug("fit: %d -> %d CPU threads (load of other processes)", self.threads, threads)
            self.threads = threads
            set_threads(threads, fused=self.fused)


@contextlib.contextmanager
def cpu_threads(
    work: int, *, n_jobs: int | None = None, device_type: str = "cpu", fused: bool = False
) -> Iterator[ThreadPlan | None]:
    """Run CPU work with the threads of a :class:`ThreadPlan` (torch's, the fused kernels', numba's and numpy's BLAS);
    restore the thread counts after it.

    ``n_jobs`` None reads ``settings.n_jobs``. ``fused``: the fit's fused kernels do the heavy work (see
    :func:`set_threads`). Yields None (and changes nothing) on other devices.
    """
    if device_type != "cpu":
        yield None
        return
    import torch
    from threadpoolctl import threadpool_limits

    from ._settings import settings

    global _kernel_threads
    before_torch, before_kernels = torch.get_num_threads(), _kernel_threads
    numba = _numba()
    before_numba = numba.get_num_threads() if numba is not None else None
    plan = ThreadPlan(work, settings.n_jobs if n_jobs is None else n_jobs, fused=fused)
    logger.debug("%d CPU thread(s) for work of %d", plan.threads, work)
    set_threads(plan.threads, fused=fused)
    try:
        with threadpool_limits(plan.threads, user_api="blas"):  # numpy's BLAS spins while it waits too
            yield plan
    finally:
        if torch.get_num_threads() != before_torch:
            torch.set_num_threads(before_torch)
        _kernel_threads = before_kernels
        if numba is not None:
            numba.set_num_threads(before_numba)
