"""fluxvelo.datasets: registry, loaders (local, checksum, download failures) and the simulator."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from conftest import DATA_DIR, shared_file
from scipy.integrate import solve_ivp

import fluxvelo as fv
from fluxvelo.datasets import _load
from fluxvelo.datasets._simulation import CELL_CYCLE_MARKERS
from fluxvelo.tl._turnover import CELL_CYCLE_GENES

BENCHMARK_MD = Path(__file__).resolve().parents[1].parent / "shared" / "BENCHMARK.md"
PAPER = {  # BENCHMARK.md row name -> registry name
    "pancreas": "pancreas",
    "bone marrow": "bonemarrow",
    "dentate gyrus": "dentategyrus",
    "gastrulation erythroid": "gastrulation_erythroid",
    "hindbrain GABA/Glio": "hindbrain",
}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No data_dir, an empty cache, and any real download attempt fails the test."""
    monkeypatch.delenv("FLUXVELO_DATA_DIR", raising=False)
    monkeypatch.setattr(fv.settings, "_data_dir", None)
    monkeypatch.setattr(fv.settings, "_cache_dir", tmp_path / "cache")
    import pooch

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to download")

    monkeypatch.setattr(pooch, "retrieve", no_network)
    return tmp_path


def _tiny_h5ad(path: Path, n_obs: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata = anndata.AnnData(np.ones((n_obs, 3), dtype=np.float32))
    adata.obs["clusters"] = ["a"] * n_obs  # strings: the loader must make them categorical
    adata.write_h5ad(path)
    return path


def _all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*")] if folder.exists() else []


# --------------------------------------------------------------------------- registry


def _benchmark_rows() -> dict[str, dict]:
    if not BENCHMARK_MD.exists():
        pytest.skip(f"{BENCHMARK_MD} not found")
    rows = {}
    for line in BENCHMARK_MD.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in PAPER:
            edges = [tuple(e.strip() for e in edge.split("->")) for edge in cells[5].split(";")]
            rows[PAPER[cells[0]]] = {
                "n_obs": int(cells[2].replace(",", "")),
                "cluster_key": cells[3],
                "basis": cells[4],
                "edges": edges,
            }
    return rows


def test_paper_entries_match_benchmark_md():
    rows = _benchmark_rows()
    assert set(rows) == set(PAPER.values())
    assert fv.datasets.available(tag="paper") == list(PAPER.values())
    for name, row in rows.items():
        entry = fv.datasets.info(name)
        assert entry.edges == row["edges"], name
        assert all(isinstance(e, tuple) for e in entry.edges)
        assert entry.cluster_key == row["cluster_key"], name
        assert entry.basis == row["basis"], name
        assert entry.n_obs == row["n_obs"], name
        assert entry["edges"] == entry.edges  # dict-style access too


def test_registry_entries_complete():
    names = fv.datasets.available()
    assert {"pancreas_2000", "pancreas_50obs", "dentategyrus_50obs"} <= set(names)
    for name in names:
        entry = fv.datasets.info(name)
        assert entry.file, name
        assert re.fullmatch(r"|[0-9a-f]{64}", entry.sha256), name
        if "paper" in entry.tags:
            assert entry.cluster_key and entry.basis and entry.edges, name
            assert bool(entry.url) == (name != "hindbrain"), name
        # every edge endpoint named in one dataset is a cluster, never an empty string
        assert all(a and b for a, b in entry.edges)
    hind = fv.datasets.info("hindbrain")
    assert hind.url == "" and "no public download" in hind.note
    p2k = fv.datasets.info("pancreas_3696x2000")  # alias
    assert p2k.name == "pancreas_2000" and p2k.file == "pancreas_3696x2000.h5ad"
    assert p2k.sha256 == "311523d1c7b95f54f4365f658f58ba6973a8ab341fb6d0d54381539cf7080ce4"
    assert p2k.url == "" and p2k.cluster_key == "clusters" and p2k.basis == "umap" and not p2k.embedding_in_file
    assert p2k.edges == fv.datasets.info("pancreas").edges
    with pytest.raises(ValueError, match="Unknown dataset"):
        fv.datasets.info("no_such_dataset")


def test_urls_are_scvelos():
    scv_datasets = pytest.importorskip("scvelo.datasets._datasets")
    src = inspect.getsource(scv_datasets).replace("{url_datadir}", scv_datasets.url_datadir)
    for name in ["pancreas", "bonemarrow", "dentategyrus", "gastrulation_erythroid"]:
        entry = fv.datasets.info(name)
        assert f'"{entry.url}"' in src, name
        assert entry.file in src, name  # scVelo's default file name


def test_fixture_checksums_match_shared_sha256sums():
    sums_file = DATA_DIR / "SHA256SUMS"
    if not sums_file.exists():
        pytest.skip(f"{sums_file} not found")
    sums = dict(line.split()[::-1] for line in sums_file.read_text().splitlines() if line.strip())
    entries = {fv.datasets.info(n).file: fv.datasets.info(n) for n in fv.datasets.available()}
    for file, digest in sums.items():
        assert file in entries, f"{file} is not registered"
        assert entries[file].sha256 == digest, file


def test_registry_found_in_source_checkout():
    path = fv.datasets.registry_path()
    repo_copy = Path(__file__).resolve().parents[1] / "data" / "datasets.toml"
    package_copy = Path(fv.datasets.__file__).parent / "datasets.toml"
    assert path == (package_copy if package_copy.exists() else repo_copy)


# --------------------------------------------------------------------------- loading


def test_load_pancreas_2000_from_env_data_dir(monkeypatch, isolated):
    file = shared_file("pancreas_3696x2000.h5ad")
    monkeypatch.setenv("FLUXVELO_DATA_DIR", str(file.parent))
    adata = fv.datasets.load("pancreas_2000")
    assert adata.shape == (3696, 2000)
    assert {"spliced", "unspliced"} <= set(adata.layers)
    assert isinstance(adata.obs["clusters"].dtype, pd.CategoricalDtype)
    clusters = set(adata.obs["clusters"].cat.categories)
    assert {c for edge in fv.datasets.info("pancreas_2000").edges for c in edge} <= clusters
    # named loader and alias resolve to the same file
    assert fv.datasets.resolve("pancreas_3696x2000") == file
    assert fv.datasets.pancreas_2000().obs_names.equals(adata.obs_names)
    assert "pancreas_2000" in fv.datasets.available(local=True)
    assert "pancreas" not in fv.datasets.available(local=True)


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
def test_fixture_labels_joined_by_barcode(monkeypatch, isolated):
    file = shared_file("pancreas_50obs.h5ad")
    shared_file("pancreas_3696x2000.h5ad")
    monkeypatch.setattr(fv.settings, "data_dir", file.parent)
    adata = fv.datasets.load("pancreas_50obs")
    assert adata.n_obs == 50
    labels = anndata.read_h5ad(file.parent / "pancreas_3696x2000.h5ad", backed="r").obs["clusters"]
    assert adata.obs["clusters"].notna().all()
    assert (adata.obs["clusters"].astype(str) == labels.loc[adata.obs_names].astype(str)).all()


def test_resolution_order(isolated, monkeypatch):
    name, file = "dentategyrus", fv.datasets.info("dentategyrus").file  # no sha256 in the registry
    data_dir, cache_dir, explicit = isolated / "data", isolated / "cache", isolated / "mine"
    _tiny_h5ad(cache_dir / file, 3)
    assert fv.datasets.load(name).n_obs == 3  # cache
    _tiny_h5ad(data_dir / file, 4)
    monkeypatch.setenv("FLUXVELO_DATA_DIR", str(data_dir))
    assert fv.datasets.load(name).n_obs == 4  # data_dir beats cache
    _tiny_h5ad(explicit / file, 5)
    assert fv.datasets.load(name, path=explicit).n_obs == 5  # a folder
    adata = fv.datasets.dentategyrus(path=explicit / file)  # a file
    assert adata.n_obs == 5
    assert isinstance(adata.obs["clusters"].dtype, pd.CategoricalDtype)


def test_sha256_mismatch_raises(isolated, monkeypatch):
    bad = isolated / "data" / "pancreas_3696x2000.h5ad"
    bad.parent.mkdir()
    bad.write_bytes(b"not the real file")
    monkeypatch.setattr(fv.settings, "data_dir", bad.parent)
    with pytest.raises(ValueError, match="Checksum mismatch.*pancreas_3696x2000"):
        fv.datasets.load("pancreas_2000")
    with pytest.raises(ValueError, match="Checksum mismatch"):
        fv.datasets.load("pancreas_2000", path=bad)
    assert bad.exists()  # a user's file is never deleted


def test_offline_download_fails_clearly_and_leaves_nothing(isolated, monkeypatch):
    import pooch

    calls = []

    def offline(url, known_hash=None, fname=None, path=None, **kwargs):
        calls.append(url)
        Path(path, fname).write_bytes(b"partial")  # a half-written file, as a dropped connection leaves
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(FileNotFoundError) as err:
        fv.datasets.pancreas()
    msg = str(err.value)
    assert "endocrinogenesis_day15.h5ad" in msg and "FLUXVELO_DATA_DIR" in msg and "path=" in msg
    assert calls == [fv.datasets.info("pancreas").url]
    assert _all_files(isolated / "cache") == []  # neither the file nor the temporary folder


def test_no_download_when_not_allowed_or_no_url(isolated):
    with pytest.raises(FileNotFoundError, match="download=False"):
        fv.datasets.load("bonemarrow", download=False)
    with pytest.raises(FileNotFoundError, match="no public download.*Hindbrain_GABA_Glio.h5ad"):
        fv.datasets.hindbrain()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fv.datasets.load("hindbrain", path=isolated / "nowhere.h5ad")
    assert _all_files(isolated / "cache") == []


def test_download_moves_file_into_cache_only_when_hash_checks(isolated, monkeypatch):
    import pooch

    payload = isolated / "payload.h5ad"
    _tiny_h5ad(payload, 6)

    def fake_retrieve(url, known_hash=None, fname=None, path=None, **kwargs):
        target = Path(path, fname)
        target.write_bytes(payload.read_bytes())
        return str(target)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    cache = isolated / "cache"
    assert fv.datasets.load("gastrulation_erythroid").n_obs == 6
    assert sorted(p.name for p in _all_files(cache)) == ["erythroid_lineage.h5ad"]

    # with a registry sha256 that the download does not match: error, nothing kept
    entry = dataclasses.replace(fv.datasets.info("bonemarrow"), sha256="0" * 64)
    monkeypatch.setattr(_load, "_lookup", lambda name: entry)
    with pytest.raises(ValueError, match="sha256"):
        fv.datasets.load("bonemarrow")
    assert sorted(p.name for p in _all_files(cache)) == ["erythroid_lineage.h5ad"]


@pytest.fixture
def local_server(tmp_path):
    """A throwaway HTTP server on 127.0.0.1 serving tmp_path/www (no outside network)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_real_pooch_download_checks_sha256(monkeypatch, tmp_path, local_server):
    root, base = local_server
    monkeypatch.delenv("FLUXVELO_DATA_DIR", raising=False)
    monkeypatch.setattr(fv.settings, "_data_dir", None)
    monkeypatch.setattr(fv.settings, "_cache_dir", tmp_path / "cache")
    monkeypatch.setattr(fv.settings, "progress_bar", False)
    served = _tiny_h5ad(root / "served.h5ad", 7)
    digest = fv.datasets.file_sha256(served)
    good = dataclasses.replace(fv.datasets.info("bonemarrow"), url=f"{base}/served.h5ad", sha256=digest)
    monkeypatch.setattr(_load, "_lookup", lambda name: good)
    assert fv.datasets.load("bonemarrow").n_obs == 7
    assert [p.name for p in _all_files(tmp_path / "cache")] == ["human_cd34_bone_marrow.h5ad"]

    (tmp_path / "cache" / "human_cd34_bone_marrow.h5ad").unlink()
    bad = dataclasses.replace(good, sha256="f" * 64)
    monkeypatch.setattr(_load, "_lookup", lambda name: bad)
    with pytest.raises(ValueError, match="sha256"):
        fv.datasets.load("bonemarrow")
    missing = dataclasses.replace(good, url=f"{base}/missing.h5ad")
    monkeypatch.setattr(_load, "_lookup", lambda name: missing)
    with pytest.raises(FileNotFoundError, match="Could not download.*FLUXVELO_DATA_DIR"):
        fv.datasets.load("bonemarrow")
    assert _all_files(tmp_path / "cache") == []


# --------------------------------------------------------------------------- simulation


@pytest.fixture(scope="module")
def sim():
    return fv.datasets.simulation(n_cells=1000, n_genes=100, random_state=0)


def test_simulation_shapes_and_keys(sim, tmp_path):
    assert sim.shape == (1000, 100)
    for key in ["spliced", "unspliced", "true_spliced", "true_unspliced", "true_velocity", "true_velocity_u"]:
        assert sim.layers[key].shape == sim.shape
    for key in ["spliced", "unspliced"]:
        x = sim.layers[key].toarray()
        assert np.array_equal(x, np.round(x)) and x.min() >= 0 and x.sum() > 0
    assert np.array_equal(sim.X.toarray(), sim.layers["spliced"].toarray())
    assert isinstance(sim.obs["clusters"].dtype, pd.CategoricalDtype)
    assert list(sim.obs["branch"].cat.categories) == ["trunk", "A", "B"]
    assert {"true_alpha", "true_beta", "true_gamma"} <= set(sim.var)
    assert sim.obsm["X_umap"].shape == (1000, 2)
    edges = [tuple(e) for e in sim.uns["true_edges"]]
    assert edges == [("Root", "Progenitor"), ("Progenitor", "A1"), ("A1", "A2"), ("Progenitor", "B1"), ("B1", "B2")]
    assert set(sim.obs["clusters"].unique()) == {c for e in edges for c in e}
    # edges point forward in time; branches hold their own clusters
    mean_t = sim.obs.groupby("clusters", observed=True)["true_time"].mean()
    assert all(mean_t[a] < mean_t[b] for a, b in edges)
    assert (sim.obs.loc[sim.obs["branch"] == "A", "clusters"].isin(["A1", "A2"])).all()
    # the layout advances with time along each path
    for b in ["trunk", "A", "B"]:
        m = (sim.obs["branch"] == b).values
        dist = np.linalg.norm(sim.obsm["X_umap"][m] - sim.obsm["X_umap"][sim.obs["true_time"].values.argmin()], axis=1)
        assert np.corrcoef(dist, sim.obs["true_time"].values[m])[0, 1] > 0.8
    path = tmp_path / "sim.h5ad"
    sim.write_h5ad(path)  # everything is serialisable
    assert anndata.read_h5ad(path).uns["true_edges"].shape == (5, 2)


def test_simulation_deterministic_and_fast():
    import time

    t0 = time.perf_counter()
    a = fv.datasets.simulation(random_state=3)
    elapsed = time.perf_counter() - t0
    b = fv.datasets.simulation(random_state=3)
    c = fv.datasets.simulation(random_state=4)
    for key in ["spliced", "unspliced"]:
        assert (a.layers[key] != b.layers[key]).nnz == 0
        assert (a.layers[key] != c.layers[key]).nnz > 0
    assert np.array_equal(a.layers["true_velocity"], b.layers["true_velocity"])
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert elapsed < 1.0, f"simulation took {elapsed:.2f} s"
    rng_state = np.random.get_state()[1].copy()
    fv.datasets.simulation(n_cells=50, n_genes=5, random_state=0)
    assert np.array_equal(rng_state, np.random.get_state()[1])  # global seed untouched


def test_simulation_velocity_is_the_kinetics(sim):
    u, s = sim.layers["true_unspliced"].astype(float), sim.layers["true_spliced"].astype(float)
    beta, gamma = sim.var["true_beta"].values, sim.var["true_gamma"].values
    scale = np.abs(s).max()
    np.testing.assert_allclose(sim.layers["true_velocity"], beta * u - gamma * s, atol=1e-5 * scale)
    np.testing.assert_allclose(
        sim.layers["true_velocity_u"], sim.layers["true_alpha"] - beta * u, atol=1e-5 * scale
    )
    on, off = sim.var["true_alpha"].values, sim.var["true_alpha_off"].values
    alpha = sim.layers["true_alpha"]
    assert np.all(np.isclose(alpha, on, rtol=1e-6) | np.isclose(alpha, off, rtol=1e-6))
    # both induction and repression happen
    assert (sim.layers["true_velocity"] > 0.1).mean() > 0.05 and (sim.layers["true_velocity"] < -0.1).mean() > 0.05


def _ode_reference(row: pd.Series, branch: str, t_cells: np.ndarray):
    """u, s, alpha at t_cells by numerical integration from the steady state, switch by switch."""
    beta, gamma = row["true_beta"], row["true_gamma"]
    levels = {True: row["true_alpha"], False: row["true_alpha_off"]}
    on = bool(row["true_initial_on"])
    y = [levels[on] / beta, levels[on] / gamma]
    switches = [t for t in (row["true_switch_trunk"], row[f"true_switch_{branch}"]) if not np.isnan(t)]
    bounds = [0.0, *switches, t_cells.max() + 1.0]
    u_ref, s_ref, alpha_ref = (np.empty(len(t_cells)) for _ in range(3))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        a = levels[on]

        def rhs(t, y, a=a):
            return [a - beta * y[0], beta * y[0] - gamma * y[1]]

        sol = solve_ivp(rhs, (lo, hi), y, rtol=1e-10, atol=1e-12, dense_output=True)
        m = (t_cells >= lo) & (t_cells < hi)
        u_ref[m], s_ref[m] = sol.sol(t_cells[m])
        alpha_ref[m] = a
        y, on = sol.y[:, -1], not on
    return u_ref, s_ref, alpha_ref


def test_simulation_matches_an_ode_solver(sim):
    """u, s and alpha equal a fine numerical integration of the ODE along each cell's path."""
    genes = np.random.default_rng(0).choice(sim.n_vars, 8, replace=False)
    for g in genes:
        for branch in ["A", "B"]:
            cells = np.where(sim.obs["branch"].isin(["trunk", branch]).values)[0][:40]  # trunk and branch cells
            u_ref, s_ref, alpha_ref = _ode_reference(sim.var.iloc[g], branch, sim.obs["true_time"].values[cells])
            np.testing.assert_allclose(sim.layers["true_unspliced"][cells, g], u_ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sim.layers["true_spliced"][cells, g], s_ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sim.layers["true_alpha"][cells, g], alpha_ref, rtol=1e-6)


@pytest.mark.parametrize("noise", ["poisson", "nb"])
def test_simulation_count_noise(noise):
    theta = 5.0
    adata = fv.datasets.simulation(n_cells=2000, n_genes=50, noise=noise, theta=theta, random_state=1)
    mu = adata.obs["true_size_factor"].values[:, None] * adata.layers["true_spliced"]
    x = adata.layers["spliced"].toarray()
    # unbiased per gene: totals within 5 Poisson/NB standard deviations
    var_total = (mu + (mu**2 / theta if noise == "nb" else 0)).sum(0)
    assert np.all(np.abs(x.sum(0) - mu.sum(0)) < 5 * np.sqrt(var_total) + 1)
    # the variance law: Poisson var = mean; NB var = mean + mean^2 / theta
    excess = ((x - mu) ** 2 - mu).sum() / (mu**2).sum()
    if noise == "poisson":
        assert abs(excess) < 0.05
    else:
        assert 0.7 / theta < excess < 1.3 / theta
    sf = adata.obs["true_size_factor"].values
    assert 0.15 < np.log(sf).std() < 0.45 and abs(sf.mean() - 1) < 0.05


def test_simulation_noise_free_and_options():
    adata = fv.datasets.simulation(n_cells=300, n_genes=10, noise=None, branches=["x", "y", "z"], branch_clusters=1)
    expected = adata.obs["true_size_factor"].values[:, None] * adata.layers["true_spliced"]
    np.testing.assert_allclose(adata.layers["spliced"].toarray(), expected, rtol=1e-5)
    edges = [tuple(e) for e in adata.uns["true_edges"]]
    assert edges[-3:] == [("Progenitor", "x"), ("Progenitor", "y"), ("Progenitor", "z")]
    with pytest.raises(ValueError, match="noise"):
        fv.datasets.simulation(noise="gaussian")
    with pytest.raises(ValueError, match="branches"):
        fv.datasets.simulation(branches=["a", "a"])


def test_simulation_cell_cycle_markers_mark_the_dividing_cells():
    kw = dict(n_cells=400, n_genes=10, growth_rate=0.3, random_state=3)
    plain = fv.datasets.simulation(**kw)
    marked = fv.datasets.simulation(cell_cycle_genes=4, **kw)
    assert list(marked.var_names[10:]) == ["Mki67", "Top2a", "Cdk1", "Birc5"]
    assert {g.upper() for g in CELL_CYCLE_MARKERS} <= set(CELL_CYCLE_GENES)  # all scored by turnover='auto'
    assert marked.var["true_cell_cycle"].sum() == 4
    for key in ("spliced", "unspliced"):  # the kinetic genes are those of the same seed without markers
        np.testing.assert_array_equal(marked.layers[key][:, :10].toarray(), plain.layers[key].toarray())
    assert np.isnan(marked.layers["true_velocity"][:, 10:]).all()
    cycling = marked.obs["true_cycling"].to_numpy()
    assert not cycling[marked.obs["true_turnover"].to_numpy() < 0].any()  # only dividing cells cycle
    counts = marked.layers["spliced"][:, 10:].toarray() / marked.obs["true_size_factor"].to_numpy()[:, None]
    assert 3.0 < counts[cycling].mean() / counts[~cycling].mean() < 5.0  # 8 against 2 expected
    with pytest.raises(ValueError, match="growth_rate"):
        fv.datasets.simulation(n_cells=50, n_genes=5, cell_cycle_genes=3)


def test_simulation_recoverable_by_scvelo_stochastic(sim):
    scv = pytest.importorskip("scvelo")
    import scanpy as sc

    adata = sim.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.pp.filter_and_normalize(adata, min_shared_counts=10)
        sc.pp.log1p(adata)
        sc.pp.pca(adata, n_comps=30, random_state=0)
        sc.pp.neighbors(adata, n_neighbors=30, n_pcs=30, random_state=0)
        scv.pp.moments(adata, n_pcs=None, n_neighbors=None)
        scv.tl.velocity(adata, mode="stochastic")
    genes = adata.var["velocity_genes"].values
    assert genes.sum() >= 50
    v, truth = adata.layers["velocity"][:, genes], adata.layers["true_velocity"][:, genes]
    cos = (v * truth).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(truth, axis=1))
    shuffled = truth[np.random.default_rng(0).permutation(adata.n_obs)]
    cos_null = (v * shuffled).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(shuffled, axis=1))
    assert np.mean(cos) > 0.5, np.mean(cos)
    assert np.mean(cos) > np.mean(cos_null) + 0.4
