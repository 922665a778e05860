"""numba's cache location for fluxvelo's kernels, and the one log line before a compile."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numba
import pytest

import fluxvelo as fv
from fluxvelo import _jit


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
