"""CPU threads: scanpy's n_jobs convention, the per-fit plan from work and load, and that counts are restored."""

from __future__ import annotations

import subprocess
import sys
import time

import numba
import numpy as np
import pytest
import threadpoolctl
import torch

import fluxvelo as fv
from fluxvelo import _threads


def test_n_jobs_follows_scanpy_convention(monkeypatch):
    monkeypatch.setattr(_threads, "usable_cores", lambda: 4)
    assert _threads.resolve_n_jobs(None) is None
    assert _threads.resolve_n_jobs(2) == 2 and _threads.resolve_n_jobs(16) == 4
    assert _threads.resolve_n_jobs(-1) == 4 and _threads.resolve_n_jobs(-2) == 3 and _threads.resolve_n_jobs(-9) == 1


@pytest.mark.parametrize("bad", [0, 1.5, "2"])
def test_settings_reject_bad_n_jobs(bad):
    before = fv.settings.n_jobs
    with pytest.raises(ValueError, match="n_jobs"):
        fv.settings.n_jobs = bad
    assert fv.settings.n_jobs == before


def _blas_threads() -> list[int]:
    np.ones((2, 2)) @ np.ones((2, 2))  # numpy's BLAS is loaded
    return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]


def test_small_work_runs_on_one_thread_and_counts_are_restored():
    torch_before, numba_before, blas_before = torch.get_num_threads(), numba.get_num_threads(), _blas_threads()
    with _threads.cpu_threads(_threads.SINGLE_THREAD_WORK - 1) as plan:
        assert plan.threads == 1 and torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        assert set(_blas_threads()) == {1}
    assert torch.get_num_threads() == torch_before and numba.get_num_threads() == numba_before
    assert _blas_threads() == blas_before
    with _threads.cpu_threads(10, device_type="cuda") as plan:
        assert plan is None


def test_fixed_n_jobs_wins(monkeypatch):
    monkeypatch.setattr(fv.settings, "n_jobs", 1)
    with _threads.cpu_threads(_threads.SINGLE_THREAD_WORK * 8) as plan:
        assert plan.threads == 1 and plan.probe is None


def test_plan_backs_off_when_other_processes_load_the_cores(monkeypatch):
    monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(_threads, "FIRST_SAMPLE_S", 0.0)
    load = {"others": 0.0}
    monkeypatch.setattr(_threads.LoadProbe, "others", lambda self: load["others"])
    with _threads.cpu_threads(_threads.SINGLE_THREAD_WORK * 8, n_jobs=None) as plan:
        assert plan.threads == 2
        load["others"] = 1.0  # one busy neighbour
        plan.update()
        assert plan.threads == 1 and torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        load["others"] = 0.1
        plan.update()
        assert plan.threads == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_probe_sees_a_busy_process():
    if _threads.usable_cores() < 2:
        pytest.skip("needs two cores")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        probe = _threads.LoadProbe()
        time.sleep(0.5)
        assert probe.others() > 0.5
    finally:
        busy.kill()
        busy.wait()


def test_import_does_not_load_heavy_modules():
    code = "import sys, fluxvelo; print(sorted(m for m in ('torch', 'scanpy', 'numba', 'anndata') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert fv.pp.__name__ == "fluxvelo.pp" and "tl" in dir(fv)
    with pytest.raises(AttributeError):
        fv.not_a_module


def test_fused_work_gives_the_kernels_the_threads_and_torch_one(monkeypatch):
    """torch's idle OpenMP workers spin; beside the fused kernels' own threads it runs on one."""
    monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
    torch_before = torch.get_num_threads()
    with _threads.cpu_threads(_threads.SINGLE_THREAD_WORK * 8, n_jobs=2, fused=True) as plan:
        assert plan.threads == 2 and _threads.kernel_threads() == 2 and torch.get_num_threads() == 1
        monkeypatch.setattr(_threads.LoadProbe, "free_cores", lambda self: 1)
        plan.fixed = None
        plan.probe = _threads.LoadProbe()
        plan.update()
        assert _threads.kernel_threads() == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == torch_before and _threads.kernel_threads() == torch_before


def test_kernel_threads_share_the_rectangles():
    """Every rectangle runs once, on the caller's thread and the pool's; a helper's error reaches the caller."""
    import threading

    from fluxvelo.flux import _kernel_cpu

    seen = []

    def kernel(tag, g0, g1, n0, n1):
        time.sleep(0.02)
        seen.append((tag, g0, g1, n0, n1, threading.get_ident()))

    assert _kernel_cpu.tasks(8, 5, 2) == tuple((g, g + 1, 0, 5) for g in range(8))  # one block each
    _kernel_cpu._run(kernel, ("a",), 8, 5, 2)
    assert sorted(r[1] for r in seen) == list(range(8)) and {r[0] for r in seen} == {"a"}
    assert len({r[-1] for r in seen}) == 2

    def failing(g0, g1, n0, n1):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("helper failed")
        time.sleep(0.02)

    with pytest.raises(RuntimeError, match="helper failed"):
        _kernel_cpu._run(failing, (), 8, 5, 2)
