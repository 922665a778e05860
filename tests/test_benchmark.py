"""fv.benchmark: outputs, 'data not available' rows, metrics equal to fv.metrics on the same AnnData, truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import fluxvelo as fv
from fluxvelo.benchmark._memory import Measure
from fluxvelo.benchmark._result import EDGE_COLUMNS, RUN_COLUMNS

pytest.importorskip("scvelo")

SIM = {"n_cells": 300, "n_genes": 30}
METHODS = ["fluxvelo", "scvelo_stochastic"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny run: the simulation (two seeds) and two datasets that are not there; the network is off limits."""
    import pooch

    empty = tmp_path_factory.mktemp("no_data")
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXVELO_DATA_DIR", str(empty))
        mp.setattr(fv.settings, "_data_dir", None)
        mp.setattr(fv.settings, "_cache_dir", empty)

        def no_network(*args, **kwargs):
            raise AssertionError("the benchmark tried to download")

        mp.setattr(pooch, "retrieve", no_network)
        result = fv.benchmark.run(
            ["simulation", "pancreas_2000", "bonemarrow"],
            methods=METHODS,
            seeds=2,
            out=out,
            method_options={"fluxvelo": {"epochs": 1, "device": "cpu"}},
            simulation_options=SIM,
            download=False,
        )
    return result, out


def test_writes_csv_markdown_and_figure(bench):
    result, out = bench
    runs = pd.read_csv(out / "results.csv")
    assert list(runs.columns) == RUN_COLUMNS
    assert list(pd.read_csv(out / "per_edge.csv").columns) == EDGE_COLUMNS
    summary = pd.read_csv(out / "summary.csv")
    for col in ["dataset", "method", "status", "n_runs", "cbc_mean", "cbc_sd", "consistency_mean",
                "in_cluster_coherence_mean", "velocity_cosine_mean", "sign_accuracy_mean", "fit_time_s_mean",
                "peak_rss_mb_mean"]:  # fmt: skip
        assert col in summary.columns, col
    md = (out / "benchmark.md").read_text(encoding="utf-8")
    assert "| dataset | fluxvelo | scvelo_stochastic |" in md
    assert "mean over real datasets" in md and "Ground truth" in md and "Per-edge CBC" in md
    assert "data not available" in md
    png = (out / "figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    ok = runs[runs["status"] == "ok"]
    assert (ok["fit_time_s"] > 0).all() and (ok["peak_rss_mb"] > 0).all()
    cfg = result.config
    assert cfg["complete"] is True
    assert cfg["methods"]["fluxvelo"]["settings"]["epochs"] == 1  # what was run is recorded
    assert cfg["methods"]["fluxvelo"]["settings"]["preset"] == "default"


def test_unavailable_datasets_get_rows_not_numbers(bench):
    result, out = bench
    runs = pd.read_csv(out / "results.csv")
    for name in ["pancreas_2000", "bonemarrow"]:
        rows = runs[runs["dataset"] == name]
        assert sorted(rows["method"]) == sorted(METHODS)
        assert (rows["status"] == "data not available").all()
        assert rows["reason"].str.contains("FLUXVELO_DATA_DIR").all()
        assert rows[["cbc", "consistency", "in_cluster_coherence", "fit_time_s"]].isna().all().all()
    assert (result.summary.loc[result.summary["dataset"] == "pancreas_2000", "status"] == "data not available").all()


def test_csv_metrics_equal_fv_metrics_on_the_same_anndata(bench):
    result, out = bench
    runs = pd.read_csv(out / "results.csv")
    per_edge = pd.read_csv(out / "per_edge.csv")
    assert {(m, s) for (_, m, s) in result.adata} == {("fluxvelo", 0), ("scvelo_stochastic", 0)}
    for (dataset, method, seed), adata in result.adata.items():
        row = runs[(runs["dataset"] == dataset) & (runs["method"] == method) & (runs["seed"] == seed)].iloc[0]
        edges = [tuple(e) for e in adata.uns["true_edges"]]
        cbc, table = fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=edges, basis="umap")
        assert row["cbc"] == pytest.approx(cbc, rel=1e-9)
        assert row["consistency"] == pytest.approx(fv.metrics.consistency(adata), rel=1e-9)
        coherence, _ = fv.metrics.in_cluster_coherence(adata, cluster_key="clusters")
        assert row["in_cluster_coherence"] == pytest.approx(coherence, rel=1e-9)
        mine = per_edge[(per_edge["method"] == method) & (per_edge["seed"] == seed)].set_index("edge")
        np.testing.assert_allclose(mine.loc[table.index, "cbc"], table["cbc"], rtol=1e-9)
        # ground truth, computed independently: cosine per cell over the genes with a finite estimate
        est, true = adata.layers["velocity"], adata.layers["true_velocity"]
        genes = np.isfinite(est).all(0)
        cos = [np.dot(e, t) / (np.linalg.norm(e) * np.linalg.norm(t)) for e, t in zip(est[:, genes], true[:, genes])]
        assert row["velocity_cosine"] == pytest.approx(np.mean(cos), rel=1e-5)
        assert row["n_genes_compared"] == genes.sum()


def test_seeds_summarised_and_deterministic_methods_run_once(bench):
    result, _ = bench
    runs = result.runs[(result.runs["dataset"] == "simulation")]
    flux = runs[runs["method"] == "fluxvelo"]
    assert list(flux["seed"]) == [0, 1] and (flux["status"] == "ok").all()
    assert list(runs.loc[runs["method"] == "scvelo_stochastic", "seed"]) == [0]
    row = result.summary[(result.summary["dataset"] == "simulation") & (result.summary["method"] == "fluxvelo")].iloc[0]
    assert row["n_runs"] == 2
    assert row["cbc_mean"] == pytest.approx(flux["cbc"].mean())
    assert row["cbc_sd"] == pytest.approx(np.std(flux["cbc"].to_numpy(), ddof=1))
    assert flux["velocity_cosine"].iloc[0] != flux["velocity_cosine"].iloc[1]  # the seed reaches the fit


def test_scvelo_stochastic_matches_scvelo_directly(bench):
    """The harness's scVelo velocities are scVelo's, on the same preprocessed data."""
    import scvelo as scv

    result, _ = bench
    adata = result.adata[("simulation", "scvelo_stochastic", 0)]
    fresh = adata.copy()
    for key in ["velocity", "variance_velocity"]:
        fresh.layers.pop(key, None)
    scv.settings.verbosity = 0
    scv.tl.velocity(fresh, mode="stochastic")
    np.testing.assert_allclose(adata.layers["velocity"], fresh.layers["velocity"], rtol=1e-6, equal_nan=True)


def test_a_failing_method_is_a_row_not_a_crash():
    result = fv.benchmark.run(["simulation"], methods="fluxvelo", seeds=1,
                              method_options={"fluxvelo": {"lr": -1.0}}, simulation_options=SIM)  # fmt: skip
    row = result.runs.iloc[0]
    assert row["status"] == "failed" and "lr" in row["reason"]
    assert np.isnan(row["cbc"]) and not result.adata


def test_a_stopped_run_keeps_its_finished_rows(tmp_path, monkeypatch):
    """results.csv and config.json are on disk after each run: stopping the second run leaves the first."""
    import json

    from fluxvelo.benchmark import _run

    class Stopped(BaseException):  # like a kill: not caught by the harness
        pass

    real, calls = _run._run_one, []

    def stop_on_second(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) > 1:
            raise Stopped
        return real(*args, **kwargs)

    monkeypatch.setattr(_run, "_run_one", stop_on_second)
    with pytest.raises(Stopped):
        fv.benchmark.run(["simulation"], methods="scvelo_stochastic,fluxvelo", seeds=1, out=tmp_path,
                         simulation_options=SIM, download=False)  # fmt: skip
    runs = pd.read_csv(tmp_path / "results.csv")
    assert list(runs.columns) == RUN_COLUMNS
    finished = runs[["dataset", "method", "seed", "status"]].values.tolist()
    assert finished == [["simulation", "scvelo_stochastic", 0, "ok"]]
    assert np.isfinite(runs["cbc"].iloc[0])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["complete"] is False and config["methods"]["scvelo_stochastic"]["settings"]["mode"] == "stochastic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "results.csv"]  # no temporary files left


def test_bad_arguments_fail_before_running():
    with pytest.raises(ValueError, match="Unknown method"):
        fv.benchmark.run(["simulation"], methods="fluxvelo,velocyto")
    with pytest.raises(ValueError, match="Unknown dataset"):
        fv.benchmark.run(["no_such_data"])
    with pytest.raises(ValueError, match="seeds"):
        fv.benchmark.run(["simulation"], seeds=0)


def test_report_files_are_utf8_whatever_the_locale(bench, tmp_path):
    import locale

    from fluxvelo.benchmark._report import write

    result, _ = bench
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # an ASCII locale, as a library or a shell may leave it
    try:
        assert locale.getpreferredencoding(False).lower() not in {"utf-8", "utf8"}
        files = write(result, tmp_path, figure=False)
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    md = files["markdown"].read_text(encoding="utf-8")
    assert "±" in md and "| dataset | fluxvelo |" in md


def test_cli_parses_and_runs(tmp_path, capsys):
    from fluxvelo.__main__ import build_parser, main

    args = build_parser().parse_args(
        ["benchmark", "--datasets", "pancreas_2000", "simulation", "--seeds", "3", "--out", "results/",
         "--methods", "fluxvelo,fluxvelo_paper", "--paper-epochs", "2"]
    )  # fmt: skip
    assert args.datasets == ["pancreas_2000", "simulation"] and args.seeds == 3 and args.paper_epochs == 2
    assert callable(args.func)
    code = main(["benchmark", "--datasets", "simulation", "--methods", "scvelo_stochastic", "--seeds", "0,4",
                 "--sim-cells", "200", "--sim-genes", "20", "--sim-seed", "5", "--out", str(tmp_path), "--no-figure",
                 "--no-progress", "--no-download"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| dataset | scvelo_stochastic |" in printed and "Ground truth" in printed
    runs = pd.read_csv(tmp_path / "results.csv")
    assert list(runs["seed"]) == [0] and (runs["status"] == "ok").all()
    assert not (tmp_path / "figure.png").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["simulation_options"]["random_state"] == 5


def test_scvelo_simulation_truth_is_scvelos_noise_free_dynamics():
    state = np.random.get_state()
    adata = fv.benchmark.scvelo_simulation(n_obs=400, n_vars=12, noise_level=0, random_state=3)
    assert np.array_equal(np.random.get_state()[1], state[1])  # scVelo's global seeding is undone
    assert adata.uns["true_params"]["exact_times"]
    # without noise scVelo's own output is the truth
    np.testing.assert_allclose(adata.layers["spliced"], adata.layers["true_spliced"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adata.layers["unspliced"], adata.layers["true_unspliced"], rtol=1e-5, atol=1e-5)
    # the true velocity is ds/dt along the trajectory (finite differences away from the switch)
    t = adata.obs["true_t"].to_numpy()
    order = np.argsort(t)
    s = adata.layers["true_spliced"][order].astype(np.float64)
    ds = np.gradient(s, t[order], axis=0)
    v = adata.layers["true_velocity"][order]
    away = np.abs(t[order][:, None] - adata.var["true_t_"].to_numpy()[None, :]) > 0.5
    assert np.corrcoef(ds[away], v[away])[0, 1] > 0.999
    assert list(adata.obs["clusters"].cat.categories) == ["t1", "t2", "t3", "t4"]
    assert adata.uns["true_edges"] == [["t1", "t2"], ["t2", "t3"], ["t3", "t4"]]


def test_ground_truth_scores():
    rng = np.random.default_rng(0)
    adata = fv.datasets.simulation(n_cells=100, n_genes=10, random_state=1)
    true = adata.layers["true_velocity"]
    adata.layers["velocity"] = true * rng.uniform(0.5, 2.0, (100, 1))  # a per-cell factor changes nothing
    scores, per_gene = fv.benchmark.ground_truth_scores(adata)
    assert scores["velocity_cosine"] == pytest.approx(1.0) and scores["sign_accuracy"] == 1.0
    adata.layers["velocity"] = -true
    adata.layers["velocity"][:, 0] = np.nan  # genes without an estimate are left out
    scores, per_gene = fv.benchmark.ground_truth_scores(adata)
    assert scores["velocity_cosine"] == pytest.approx(-1.0) and scores["sign_accuracy"] == 0.0
    assert scores["n_genes_compared"] == 9 and np.isnan(per_gene.iloc[0])


def test_measure_sees_native_allocations():
    pytest.importorskip("psutil")  # without it only getrusage high-water marks are available
    with Measure() as used:
        block = np.ones(25_000_000)  # 200 MB outside Python's allocator
        block[::512] += 1
        import time

        time.sleep(0.1)
    del block
    assert used.delta_mb > 150 and used.seconds >= 0.1


def test_stand_ins_simulate_the_size_of_a_real_dataset():
    from fluxvelo.benchmark._datasets import canonical_name, prepare

    assert canonical_name("dentategyrus_standin") == "dentategyrus_standin"
    with pytest.raises(ValueError):
        canonical_name("no_such_dataset_standin")
    prep = prepare("dentategyrus_standin", download=False, simulation_options={"n_genes": 20})
    assert prep.adata.n_obs == fv.datasets.info("dentategyrus").n_obs == 2930
    assert prep.kind == "simulation" and prep.edges


def test_benchmark_modules_import_no_circle():
    """No module of fluxvelo.benchmark imports, directly or through others, one that imports it back (any import
    statement counts: at the top, inside a function or under TYPE_CHECKING)."""
    import ast
    from pathlib import Path

    folder = Path(fv.benchmark.__file__).parent
    graph = {}
    for path in folder.glob("_*.py"):
        if path.name == "__init__.py":
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                targets.update(n.split(".")[0] for n in names)
        graph[path.stem] = targets & {p.stem for p in folder.glob("_*.py")}
    assert graph["_run"] >= {"_report", "_result"} and "_run" not in graph["_report"]

    def visit(node, stack):
        assert node not in stack, f"import circle: {' -> '.join([*stack, node])}"
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for module in graph:
        visit(module, [])


def test_growth_simulation_carries_the_turnover_that_the_default_finds():
    from fluxvelo.benchmark._datasets import prepare
    from fluxvelo.tl._turnover import resolve_source

    prep = prepare("growth_simulation", download=False, simulation_options={"n_cells": 300, "n_genes": 20})
    assert prep.kind == "simulation" and prep.adata.uns["true_params"]["growth_rate"] > 0
    assert resolve_source(prep.adata, "auto") == "cell_cycle"
    plain = prepare("simulation", download=False, simulation_options={"n_cells": 300, "n_genes": 20})
    assert resolve_source(plain.adata, "auto") is None
