"""Benchmark methods beyond fluxvelo and scVelo: the registry, peers that are missing or fail, the .h5ad exchange."""

from __future__ import annotations

import json
import sys
import textwrap

import anndata
import numpy as np
import pandas as pd
import pytest

import fluxvelo as fv
from fluxvelo.benchmark import METHODS, Method, MethodNotAvailable, external_method, register_method
from fluxvelo.benchmark import _peer_fits
from fluxvelo.benchmark._external import exchange_input, run_external

pytest.importorskip("scvelo")

SIM = {"n_cells": 150, "n_genes": 12}

#: A peer in a script: velocity Mu - Ms plus seeded noise on the first half of the genes, NaN on the rest.
FAKE_PEER = '''
import numpy as np


def fit_fakepeer(adata, seed, options, *, cluster_key, basis, workdir):
    if options.get("fail"):
        raise RuntimeError("the fake peer was told to fail")
    half = adata.n_vars // 2
    mu, ms = np.asarray(adata.layers["Mu"]), np.asarray(adata.layers["Ms"])
    v = np.full(adata.shape, np.nan, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(scale=options.get("noise", 0.0), size=(adata.n_obs, half))
    v[:, :half] = mu[:, :half] - ms[:, :half] + noise
    adata.layers["velocity"] = v
    adata.var["velocity_genes"] = np.arange(adata.n_vars) < half
    (workdir / "seen.json").write_text("{}")
    return {"half": half, "clusters": sorted(set(adata.obs[cluster_key])), "basis": basis,
            "has_embedding": f"X_{basis}" in adata.obsm, "workdir_exists": workdir.is_dir()}
'''


@pytest.fixture
def registry():
    """The methods' table, restored after the test."""
    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


@pytest.fixture
def fake_peer(tmp_path, registry):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    return register_method(
        external_method("fakepeer", "a peer in another interpreter", script=script, python=sys.executable)
    )


def _run(methods, **kwargs):
    kwargs.setdefault("simulation_options", SIM)
    kwargs.setdefault("figure", False)
    return fv.benchmark.run(["simulation"], methods=methods, download=False, **kwargs)


def test_register_method_adds_to_the_table_and_refuses_duplicates(registry):
    def fit(adata, seed, options):
        adata.layers["velocity"] = np.asarray(adata.layers["Mu"]) - options["g"] * np.asarray(adata.layers["Ms"])
        adata.var["velocity_genes"] = True
        return {"g": options["g"]}

    method = register_method(Method("u_minus_gs", "Mu - g Ms", fit, deterministic=True))
    assert METHODS["u_minus_gs"] is method
    with pytest.raises(ValueError, match="registered already"):
        register_method(Method("u_minus_gs", "again", fit))
    with pytest.raises(ValueError, match="name"):
        register_method(Method("a,b", "comma", fit))
    with pytest.raises(TypeError):
        register_method(fit)
    result = _run("u_minus_gs,scvelo_stochastic", seeds=2, method_options={"u_minus_gs": {"g": 0.5}})
    rows = result.runs[result.runs["method"] == "u_minus_gs"]
    assert list(rows["status"]) == ["ok"] and list(rows["seed"]) == [0]  # deterministic: one run
    assert result.config["methods"]["u_minus_gs"]["settings"]["g"] == 0.5
    adata = result.adata[("simulation", "u_minus_gs", 0)]
    np.testing.assert_allclose(adata.layers["velocity"], adata.layers["Mu"] - 0.5 * adata.layers["Ms"], rtol=1e-6)


def test_ablation_script_registers_through_the_public_function(registry):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert METHODS["fluxvelo_ensemble"].fit is module._ensemble_fit


def test_peers_are_registered_but_not_run_by_default():
    for name in ["velovi", "unitvelo", "scvelo_rs", "celldancer"]:
        assert name in METHODS and METHODS[name].external
    from fluxvelo.benchmark._run import DEFAULT_METHODS

    assert not {"velovi", "unitvelo", "scvelo_rs", "celldancer"} & set(DEFAULT_METHODS)


def test_a_missing_peer_is_a_row_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "celldancer", None)  # importing it raises ImportError
    result = _run("celldancer,scvelo_stochastic", seeds=1)
    row = result.runs.set_index("method").loc["celldancer"]
    assert row["status"] == "method not available"
    assert "celldancer is not installed" in row["reason"] and "--peer-python celldancer=" in row["reason"]
    assert np.isnan(row["cbc"]) and np.isnan(row["fit_time_s"])
    assert result.runs.set_index("method").loc["scvelo_stochastic", "status"] == "ok"
    assert ("simulation", "celldancer", 0) not in result.adata
    assert "method not available" in result.to_markdown()


def test_a_failing_peer_is_a_row_not_a_crash(monkeypatch):
    def broken(adata, seed, options, **kwargs):
        raise FloatingPointError("diverged")

    monkeypatch.setitem(_peer_fits.FITS, "scvelo_rs", broken)
    monkeypatch.setitem(_peer_fits.PACKAGES, "scvelo_rs", "numpy")  # "installed"
    result = _run("scvelo_rs", seeds=1)
    row = result.runs.iloc[0]
    assert row["status"] == "method not available"
    assert row["reason"] == "scvelo_rs failed: FloatingPointError: diverged"
    assert np.isnan(row["cbc"])


def test_exchange_with_another_interpreter_returns_the_velocity(fake_peer, tmp_path):
    result = _run("fakepeer", seeds=[3, 4], method_options={"fakepeer": {"noise": 0.01}}, out=tmp_path / "out")
    runs = result.runs
    assert list(runs["status"]) == ["ok", "ok"], runs["reason"].tolist()
    adata = result.adata[("simulation", "fakepeer", 3)]
    half = adata.n_vars // 2
    v = adata.layers["velocity"]
    assert np.isnan(v[:, half:]).all() and np.isfinite(v[:, :half]).all()
    expected = adata.layers["Mu"][:, :half] - adata.layers["Ms"][:, :half]
    noise = np.random.default_rng(3).normal(scale=0.01, size=(adata.n_obs, half))
    np.testing.assert_allclose(v[:, :half], expected + noise, rtol=1e-5, atol=1e-6)  # seed 3 reached the peer
    assert list(adata.var["velocity_genes"]) == [i < half for i in range(adata.n_vars)]
    settings = json.loads(runs.iloc[0]["settings"])
    assert settings["python"] == sys.executable and settings["basis"] == "umap" and settings["has_embedding"]
    assert settings["clusters"] == sorted(set(adata.obs["clusters"].astype(str)))
    assert settings["workdir_exists"] and settings["exchange_time_s"] >= 0
    assert settings["wall_time_s"] >= runs.iloc[0]["fit_time_s"] > 0  # the peer's own fit time in the table
    assert runs.iloc[0]["velocity_cosine"] != runs.iloc[1]["velocity_cosine"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["methods"]["fakepeer"]["options"] == {"noise": 0.01}
    assert config["methods"]["fakepeer"]["settings"]["half"] == half


def test_a_peer_failing_in_the_other_interpreter_gives_its_reason(fake_peer):
    result = _run("fakepeer", seeds=1, method_options={"fakepeer": {"fail": True}})
    row = result.runs.iloc[0]
    assert row["status"] == "method not available"
    assert "fakepeer failed in" in row["reason"] and "RuntimeError: the fake peer was told to fail" in row["reason"]


def test_peer_python_that_lacks_the_peer_or_does_not_exist(tmp_path):
    if _peer_installed("celldancer"):
        pytest.skip("celldancer is installed in this interpreter")
    result = _run("celldancer,unitvelo", seeds=1,
                  peer_python={"celldancer": sys.executable, "unitvelo": tmp_path / "no" / "python"})  # fmt: skip
    rows = result.runs.set_index("method")
    assert (rows["status"] == "method not available").all()
    assert f"celldancer is not installed in {sys.executable}" in rows.loc["celldancer", "reason"]
    assert "is not an executable file" in rows.loc["unitvelo", "reason"]
    assert result.config["methods"]["celldancer"]["options"]["python"] == sys.executable
    with pytest.raises(ValueError, match="cannot run in another environment"):
        _run("fluxvelo", peer_python={"fluxvelo": sys.executable})


def test_exchange_input_keeps_what_peers_read(tmp_path):
    adata = fv.datasets.simulation(n_cells=80, n_genes=6, random_state=0)
    fv.pp.recipe_flux(adata, n_top_genes=None, embedding="umap")
    adata.obs["clusters"] = adata.obs["clusters"].astype("category")
    sent = exchange_input(adata, cluster_key="clusters", basis="umap")
    sent.write_h5ad(tmp_path / "x.h5ad")
    back = anndata.read_h5ad(tmp_path / "x.h5ad")
    assert list(back.obs.columns) == ["clusters"] and back.var.shape[1] == 0
    assert list(back.obs["clusters"].astype(str)) == list(adata.obs["clusters"].astype(str))
    for key in ["spliced", "unspliced", "Ms", "Mu"]:
        np.testing.assert_array_equal(_dense(back.layers[key]), _dense(adata.layers[key]))
    np.testing.assert_array_equal(back.obsm["X_umap"], adata.obsm["X_umap"])
    assert (back.obsp["connectivities"] != adata.obsp["connectivities"]).nnz == 0


def test_run_external_refuses_mismatched_output(tmp_path):
    script = tmp_path / "shrinking.py"
    script.write_text(textwrap.dedent('''
        import numpy as np

        def fit_shrinking(adata, seed, options, *, cluster_key, basis, workdir):
            adata._inplace_subset_var(np.arange(adata.n_vars - 1))
            adata.layers["velocity"] = np.zeros(adata.shape, dtype=np.float32)
            adata.var["velocity_genes"] = True
            return {}
    '''))  # fmt: skip
    adata = fv.datasets.simulation(n_cells=40, n_genes=5, random_state=0)
    fv.pp.recipe_flux(adata, n_top_genes=None, embedding="umap")
    with pytest.raises(MethodNotAvailable, match="differ from the input"):
        run_external(sys.executable, "shrinking", adata, 0, {}, cluster_key="clusters", basis="umap", script=script)
    assert "velocity" not in adata.layers


def test_cli_takes_peer_python_and_method_options(tmp_path, capsys, fake_peer):
    from fluxvelo.__main__ import build_parser, main

    args = build_parser().parse_args(["benchmark", "--peer-python", "unitvelo=/venv/bin/python",
                                      "--method-option", "velovi.max_epochs=100",
                                      "--method-option", "unitvelo.fit_option='2'"])  # fmt: skip
    assert args.peer_python == [("unitvelo", "/venv/bin/python")]
    assert args.method_option == [("velovi", "max_epochs", 100), ("unitvelo", "fit_option", "'2'")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["benchmark", "--method-option", "max_epochs=100"])
    code = main(["benchmark", "--datasets", "simulation", "--methods", "fakepeer,celldancer", "--seeds", "1",
                 "--sim-cells", "150", "--sim-genes", "12", "--method-option", "fakepeer.noise=0.5",
                 "--peer-python", f"celldancer={tmp_path / 'missing'}", "--out", str(tmp_path / "o"),
                 "--no-figure", "--no-progress", "--no-download"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "method not available" in printed and "celldancer" in printed
    runs = pd.read_csv(tmp_path / "o" / "results.csv").set_index("method")
    assert runs.loc["fakepeer", "status"] == "ok" and json.loads(runs.loc["fakepeer", "settings"])["half"] == 6


def _dense(x):
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def _peer_installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


@pytest.mark.skipif(not _peer_installed("velovi"), reason="velovi is not installed (pip install fluxvelo[velovi])")
def test_velovi_adapter_keeps_its_own_genes_and_writes_nan_for_the_others():
    import scvelo as scv
    from velovi import preprocess_data

    result = _run("velovi", seeds=1, method_options={"velovi": {"max_epochs": 2}},
                  simulation_options={"n_cells": 200, "n_genes": 20})  # fmt: skip
    row = result.runs.iloc[0]
    assert row["status"] == "ok", row["reason"]
    adata = result.adata[("simulation", "velovi", 0)]
    verbosity, scv.settings.verbosity = scv.settings.verbosity, 0
    kept = preprocess_data(adata.copy()).var_names  # velovi's own gene filter, independently
    scv.settings.verbosity = verbosity
    v = adata.layers["velocity"]
    in_kept = adata.var_names.isin(kept)
    assert in_kept.any() and np.isfinite(v[:, in_kept]).all() and np.isnan(v[:, ~in_kept]).all()
    settings = json.loads(row["settings"])
    assert settings["epochs_run"] == 2 and settings["genes_kept"] == in_kept.sum()


@pytest.mark.skipif(not _peer_installed("scvelo_rs"), reason="scvelo-rs is not installed (pip install fluxvelo[scvelo_rs])")
def test_scvelo_rs_adapter_is_scvelo_rs_called_directly():
    import scvelo_rs

    result = _run("scvelo_rs", seeds=1)
    adata = result.adata[("simulation", "scvelo_rs", 0)]
    fresh = adata.copy()
    for key in ["velocity", "velocity_u"]:
        fresh.layers.pop(key, None)
    fresh.var = fresh.var[[]]
    with pytest.warns(UserWarning, match="falling back to all genes"):  # unlike scVelo, which picks its genes
        scvelo_rs.tl.recover_dynamics(fresh, n_jobs=2)
    scvelo_rs.tl.velocity(fresh, mode="dynamical")
    np.testing.assert_allclose(adata.layers["velocity"], fresh.layers["velocity"], rtol=1e-6, equal_nan=True)
