"""numba's cache location for fluxvelo's kernels, the one log line before a compile, and the compile shared out."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import anndata as ad
import numba
import numpy as np
import pytest

import fluxvelo as fv
from fluxvelo import _jit, _threads


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
from unittest import mock

import torch

from fluxvelo import _jit, _threads
from fluxvelo.flux import _kernel, kernel_mean_offset, pull_back, score_gradient_terms

started = []
popen = subprocess.Popen


def record(command, **kw):
    started.append(",".join(command[5:]))
    return popen(command, **kw)


# two free cores ahead; when the fit comes, the first child keeps one of them busy
with mock.patch.object(_threads.LoadProbe, "free_cores", side_effect=[2, 1]), mock.patch.object(subprocess, "Popen", record):
    _jit.compile_fit_kernels_ahead("cpu", spare_cores=1)  # as fv.pp.recipe_flux does
    print("ahead", *started)
    kernels, _ = _kernel._cpu_kernels()  # as the fit does
print("in all", *started)
x = torch.rand(3, 20, 2)
kernel_mean_offset(x, x, 0.1)
score_gradient_terms(x, x, 0.1, x)
score_gradient_terms(x, x, 0.1, x, torch.rand(20))
pull_back(x, x, 0.1, x)
for name in _jit.FIT_KERNELS[2]:
    dispatcher = getattr(kernels, name)
    print(name, len(dispatcher.overloads), len(dispatcher.stats.cache_hits), len(dispatcher.stats.cache_misses))
"""


def test_a_compile_started_ahead_is_topped_up_when_the_fit_waits(tmp_path):
    """With an empty cache, two free cores and one to spare, one child takes every kernel, longest first; when the fit
    comes, a second child takes the rest from the other end. Every kernel's real calls then find one signature,
    loaded from the cache the children wrote (so the warm-up's types are the callers'), none compiled here."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _COMPILE_AHEAD], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ahead, in_all, *rows = run.stdout.splitlines()
    names = _jit.FIT_KERNELS[2]
    assert ahead == "ahead " + ",".join(names)
    assert in_all == f"{ahead.replace('ahead', 'in all')} {','.join(reversed(names[1:]))}"
    # name, compiled signatures, loaded from the cache, compiled here
    assert sorted(rows) == sorted(f"{name} 1 1 0" for name in _jit.FIT_KERNELS[2])


@pytest.mark.parametrize(
    ("free", "spare", "shares"),
    [
        (2, 0, [["moments_rect", "anchor_sums_rect"], ["score_terms_rect"]]),
        (3, 0, [["moments_rect"], ["score_terms_rect"], ["anchor_sums_rect"]]),
        (8, 0, [["moments_rect"], ["score_terms_rect"], ["anchor_sums_rect"]]),
        (1, 0, [["moments_rect", "score_terms_rect", "anchor_sums_rect"]]),
        (2, 1, [["moments_rect", "score_terms_rect", "anchor_sums_rect"]]),
        (1, 1, []),
    ],
)
def test_children_are_dealt_the_kernels_in_turn(monkeypatch, free, spare, shares):
    started = []
    monkeypatch.setattr(_jit.subprocess, "Popen", lambda command, **kw: started.append(command[5:]))
    monkeypatch.setattr(_threads.LoadProbe, "sampled", classmethod(lambda cls: SimpleNamespace(free_cores=lambda: free)))
    module = SimpleNamespace(__file__=__file__, __name__="kernels")
    _jit.start_children(module, _jit.FIT_KERNELS[2], spare_cores=spare)
    assert started == shares


def test_an_ahead_start_without_a_core_to_spare_leaves_the_compile_to_the_fit(tmp_path, monkeypatch):
    module = types.ModuleType("fake_kernels")
    module.__file__ = __file__
    for name in ("a", "b"):
        setattr(module, name, _dispatcher(tmp_path / name, loaded=False, cached=False))
    monkeypatch.setitem(sys.modules, "fake_kernels", module)
    monkeypatch.setattr(_jit, "_compiling", {})
    monkeypatch.setattr(_jit, "_announced", set())
    started = []
    done = SimpleNamespace(communicate=lambda timeout=None: (b"", b""), returncode=0, poll=lambda: 0)
    monkeypatch.setattr(_jit.subprocess, "Popen", lambda command, **kw: started.append(command[5:]) or done)
    monkeypatch.setattr(_threads.LoadProbe, "sampled", classmethod(lambda cls: SimpleNamespace(free_cores=lambda: 1)))
    _jit.start_compile("fake_kernels", "fake kernels", ("a", "b"), spare_cores=1)  # as recipe_flux, on a busy machine
    _jit.start_compile("fake_kernels", "fake kernels", ("a", "b"))  # as the moments inside it: left to the fit too
    assert started == []
    _jit.load_kernels("fake_kernels", "fake kernels", ("a", "b"))
    assert started == [["a", "b"]]


def test_preprocessing_starts_the_fits_compile(monkeypatch):
    """fv.pp.moments and fv.pp.recipe_flux start the compile (recipe_flux leaving a core to its own work)."""
    calls = []
    monkeypatch.setattr(_jit, "start_compile", lambda *args, **kw: calls.append((args, kw)))
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (60, 8)).astype(np.float32)
    layers = {"spliced": counts.copy(), "unspliced": rng.poisson(1.0, (60, 8)).astype(np.float32)}
    fv.pp.moments(ad.AnnData(counts.copy(), layers=layers), n_pcs=5, n_neighbors=10)
    assert calls == [(_jit.FIT_KERNELS, {"spare_cores": 0})]
    fv.pp.recipe_flux(ad.AnnData(counts.copy(), layers=layers), n_pcs=5, n_neighbors=10, embedding=None,
                      n_top_genes=None, min_counts=1)  # fmt: skip
    assert calls[1] == (_jit.FIT_KERNELS, {"spare_cores": 1})


def test_first_access_to_tl_starts_the_fits_compile_before_torch_is_imported():
    """So that the compile runs beside torch's import; in a fresh process, where fluxvelo.tl is not loaded yet. The
    children are started before torch is imported (importing the kernel module must not import it either)."""
    code = (
        "import sys\nfrom fluxvelo import _jit\nseen = []\n"
        "_jit.start_children = lambda kernels, names, **kw: seen.append((names, 'torch' in sys.modules)) or []\n"
        "_jit._uncached = lambda kernels, names: names\n"
        "import fluxvelo as fv\nfv.tl\nprint(seen)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == repr([(_jit.FIT_KERNELS[2], False)])


def test_no_compile_ahead_for_a_gpu_or_without_the_fused_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(_jit, "start_compile", lambda *args, **kw: calls.append(args))
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
    def fail(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(_jit, "start_compile", fail)
    _jit.compile_fit_kernels_ahead("cpu")  # does not raise


_FIRST_GRAPH = """
import sys
from unittest import mock

import anndata as ad
import numpy as np
import scipy.sparse as sp

import fluxvelo as fv
from fluxvelo import _jit, _threads

n, genes, k = 60, 8, 5
rng = np.random.default_rng(0)
rows = np.repeat(np.arange(n), k)
cols = (rows + np.tile(np.arange(1, k + 1), n)) % n
adata = ad.AnnData(np.zeros((n, genes), np.float32))
adata.layers["Ms"] = rng.random((n, genes), dtype=np.float32)
adata.layers["velocity"] = rng.standard_normal((n, genes)).astype(np.float32)
adata.obsp["distances"] = sp.csr_matrix((np.ones(n * k, np.float32), (rows, cols)), shape=(n, n))
adata.obsm["X_umap"] = rng.standard_normal((n, 2))
with mock.patch.object(_threads.LoadProbe, "free_cores", return_value=2):
    fv.tl.velocity_graph(adata)
    fv.tl.velocity_embedding(adata, basis="umap")
module, _, names = _jit.PROJECTION_KERNELS
if sys.argv[1] == "first":  # numpy's path, and one detached child compiling
    print(len(_jit._detached[module]))
else:  # numba's path, every kernel loaded from the cache the child wrote, none compiled here
    kernels = _jit.projection_kernels()
    for name in names:
        dispatcher = getattr(kernels, name)
        print(name, len(dispatcher.overloads), len(dispatcher.stats.cache_hits), len(dispatcher.stats.cache_misses))
"""


def test_the_graphs_kernels_compile_in_a_child_that_outlives_the_first_process(tmp_path):
    """A first velocity graph and embedding with an empty cache take numpy's path and leave one detached child
    compiling; the process exits at once, the child finishes, and the next process finds every kernel cached with
    the signatures of the real calls."""
    import time

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", _FIRST_GRAPH, "first"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["1"]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.rglob("*_projection_kernels*.nbi"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)  # the last index is written after its data
    nxt = subprocess.run([sys.executable, "-c", _FIRST_GRAPH, "next"], env=env, capture_output=True, text=True)
    assert nxt.returncode == 0, nxt.stderr
    assert sorted(nxt.stdout.splitlines()) == sorted(f"{name} 1 1 0" for name in _jit.PROJECTION_KERNELS[2])


_TINY_KERNELS = '''
import numba
import numpy as np


@numba.njit(cache=True)
def add_one(x):
    return x + 1


@numba.njit(cache=True)
def twice(x):
    return 2 * x


def warm_up(names):
    for name in names:
        globals()[name](np.float32(1))
'''

_LOAD_TINY = """
import numpy as np
import tiny_kernels
print(tiny_kernels.add_one(np.float32(1)), len(tiny_kernels.add_one.stats.cache_hits),
      len(tiny_kernels.add_one.stats.cache_misses))
"""


def _tiny_package(tmp_path):
    package = tmp_path / "site"
    package.mkdir()
    (package / "tiny_kernels.py").write_text(_TINY_KERNELS)
    return package


def test_compile_all_compiles_what_is_missing_in_children(tmp_path, monkeypatch):
    """``fluxvelo compile``'s work: the missing kernels compiled by children into numba's cache, nothing twice."""
    package = _tiny_package(tmp_path)
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    started = []
    popen = subprocess.Popen
    def record(command, **kw):
        started.append(command[5:])
        return popen(command, **kw)

    monkeypatch.setattr(_jit.subprocess, "Popen", record)
    modules = [("tiny_kernels", "the tiny kernels", ("add_one", "twice"))]
    (compiled, folder), = _jit.compile_all(modules).values()
    assert compiled == 2 and started and sorted(sum(started, [])) == ["add_one", "twice"]
    assert folder.startswith(str(tmp_path / "cache"))
    assert len(list(tmp_path.joinpath("cache").rglob("tiny_kernels.*.nbi"))) == 2
    started.clear()
    assert _jit.compile_all(modules) == {"the tiny kernels": (0, folder)} and not started


def test_kernels_compiled_at_install_load_from_a_read_only_package(tmp_path, monkeypatch):
    """A package whose folder is read-only but holds compiled kernels (``fluxvelo compile`` at install time): they
    are copied to the cache numba uses, once, and a new process loads them instead of compiling."""
    package = _tiny_package(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(package)
    install = subprocess.run([sys.executable, "-c", _LOAD_TINY], env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    assert install.stdout.split() == ["2.0", "0", "1"]  # compiled into the package's __pycache__
    built = sorted(p.name for p in (package / "__pycache__").glob("tiny_kernels.*.nb?"))
    assert len(built) == 2

    cache = tmp_path / "cache"
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(cache))
    monkeypatch.setattr(_jit, "_writable", lambda folder: not str(folder).startswith(str(package)))
    _jit.ensure_cache_dir(package / "tiny_kernels.py")
    assert sorted(p.name for p in cache.rglob("tiny_kernels.*.nb?")) == built
    assert _jit.seed_cache(package / "tiny_kernels.py", cache) == 0  # nothing newer to copy

    env["NUMBA_CACHE_DIR"] = str(cache)
    user = subprocess.run([sys.executable, "-c", _LOAD_TINY], env=env, capture_output=True, text=True)
    assert user.returncode == 0, user.stderr
    assert user.stdout.split() == ["2.0", "1", "0"]  # loaded from the copy, not compiled


def test_compile_command_reports_each_kernel_module(monkeypatch, capsys):
    from fluxvelo.__main__ import main

    monkeypatch.setattr(_jit, "compile_all", lambda: {"the fit's kernels": (4, "/c/flux"), "graph": (0, "/c/tl")})
    assert main(["compile"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["the fit's kernels: 4 compiled; cache: /c/flux", "graph: all cached already; cache: /c/tl"]
    assert lines[2].startswith("done in ")
