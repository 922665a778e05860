"""numba's cache location for fluxvelo's kernels, the one log line before a compile, and the compile shared out."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numba
import pytest

import fluxvelo as fv
from fluxvelo import _jit
from fluxvelo.flux import _kernel


@pytest.fixture
def fluxvelo_log():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fluxvelo")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _dispatcher(tmp_path, *, loaded: bool, cached: bool):
    index = tmp_path / "kernel.nbi"
    if cached:
        index.write_bytes(b"")
    cache = SimpleNamespace(_cache_path=str(tmp_path), _cache_file=SimpleNamespace(_index_path=str(index)))
    return SimpleNamespace(overloads={"sig": 1} if loaded else {}, _cache=cache)


def test_compile_is_announced_once_and_only_when_needed(tmp_path, fluxvelo_log, monkeypatch):
    monkeypatch.setattr(_jit, "_announced", set())
    _jit.announce_compile("cached kernels", [_dispatcher(tmp_path, loaded=False, cached=True)])
    _jit.announce_compile("loaded kernels", [_dispatcher(tmp_path / "x", loaded=True, cached=False)])
    assert not fluxvelo_log
    fresh = _dispatcher(tmp_path / "y", loaded=False, cached=False)
    _jit.announce_compile("new kernels", [fresh])
    _jit.announce_compile("new kernels", [fresh])
    (record,) = fluxvelo_log
    assert "compiling new kernels" in record.getMessage() and str(tmp_path / "y") in record.getMessage()


def test_cache_falls_back_when_nothing_is_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    target = tmp_path / "cache"
    monkeypatch.setattr(fv.settings, "_cache_dir", target)
    monkeypatch.setattr(_jit, "_writable", lambda folder: str(folder).startswith(str(target)))
    _jit.ensure_cache_dir(tmp_path / "pkg" / "_kernels.py")
    assert numba.config.CACHE_DIR == str(target / "numba")


def test_cache_left_to_numba_when_user_cache_is_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(_jit, "_user_cache_dir", lambda: tmp_path / "user")
    read_only = tmp_path / "ro"
    monkeypatch.setattr(_jit, "_writable", lambda folder: not str(folder).startswith(str(read_only)))
    _jit.ensure_cache_dir(read_only / "_kernels.py")
    assert numba.config.CACHE_DIR == ""


def test_writable_sees_a_missing_folder_under_a_writable_one(tmp_path):
    assert _jit._writable(tmp_path / "a" / "b")


_COMPILE_AHEAD = """
import subprocess
import sys
from unittest import mock

import anndata as ad
import numpy as np
import torch

import fluxvelo as fv
from fluxvelo import _jit, _threads
from fluxvelo.flux import _kernel, kernel_mean_offset, pull_back, score_gradient_terms

rng = np.random.default_rng(0)
counts = rng.poisson(3.0, (60, 8)).astype(np.float32)
adata = ad.AnnData(counts.copy(), layers={"spliced": counts.copy(), "unspliced": rng.poisson(1.0, (60, 8)).astype(np.float32)})
started = []
popen = subprocess.Popen


def record(command, **kw):
    if _jit._CHILD in command:  # not the processes that the preprocessing's libraries may start
        started.append(command[5:])
    return popen(command, **kw)


with mock.patch.object(_threads.LoadProbe, "free_cores", return_value=2), mock.patch.object(subprocess, "Popen", record):
    fv.pp.moments(adata, n_pcs=5, n_neighbors=10)
    print("started by moments", *(",".join(share) for share in started))
    kernels = _kernel._cpu_kernels()
print("started in all", len(started), "left to wait for", len(_jit._compiling[_jit.FIT_KERNELS[0]]))
x = torch.rand(3, 20, 2)
kernel_mean_offset(x, x, 0.1)
score_gradient_terms(x, x, 0.1, x)
score_gradient_terms(x, x, 0.1, x, torch.rand(20))
pull_back(x, x, 0.1, x)
for name in _kernel.CPU_KERNELS:
    dispatcher = getattr(kernels, name)
    print(name, len(dispatcher.overloads), len(dispatcher.stats.cache_hits), len(dispatcher.stats.cache_misses))
"""


def test_preprocessing_starts_the_fits_compile_in_children_and_the_fit_waits_for_it(tmp_path):
    """With an empty cache and two free cores, fv.pp.moments starts two children that share the fit's kernels and
    does not wait; the fit waits for them, starts none of its own, and every kernel's real calls then find one
    signature, loaded from the cache the children wrote (so the warm-up's types are the callers')."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _COMPILE_AHEAD], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    first, second, *rows = run.stdout.splitlines()
    names = _kernel.CPU_KERNELS
    assert first.split()[3:] == [",".join(names[0::2]), ",".join(names[1::2])]
    assert second == "started in all 2 left to wait for 0"
    # name, compiled signatures, loaded from the cache, compiled here
    assert sorted(rows) == sorted(f"{name} 1 1 0" for name in names)


def test_no_compile_ahead_for_a_gpu_or_without_the_fused_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(_jit, "start_compile", lambda *args: calls.append(args))
    _jit.compile_fit_kernels_ahead("cuda")
    monkeypatch.setattr(fv.settings, "device", "cuda:1")
    _jit.compile_fit_kernels_ahead()
    monkeypatch.setattr(fv.settings, "device", "auto")
    monkeypatch.setattr(fv.settings, "fused_kernels", False)
    _jit.compile_fit_kernels_ahead()
    assert calls == []
    monkeypatch.setattr(fv.settings, "fused_kernels", True)
    _jit.compile_fit_kernels_ahead("cpu")
    assert calls == [_jit.FIT_KERNELS]


def test_a_failed_compile_ahead_is_left_to_the_fit(monkeypatch):
    def fail(*args):
        raise OSError("no processes here")

    monkeypatch.setattr(_jit, "start_compile", fail)
    _jit.compile_fit_kernels_ahead("cpu")  # does not raise
