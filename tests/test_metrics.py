"""fv.metrics against literal per-cell loops written here from BENCHMARK.md, and against scVelo."""

from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import shared_file

import fluxvelo as fv

scv = pytest.importorskip("scvelo")

EDGES = [("A", "B"), ("B", "C"), ("C", "D"), ("B", "A"), ("D", "C")]
_CACHE: dict = {}


def _data() -> ad.AnnData:
    """pancreas_100obs with scVelo velocities, four clusters along PC1 and a projection onto PC1/PC2."""
    if "adata" not in _CACHE:
        adata = ad.read_h5ad(shared_file("pancreas_100obs_preprocessed.h5ad"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scv.tl.velocity(adata, mode="stochastic")
        adata.obs["clusters"] = pd.Categorical(pd.qcut(adata.obsm["X_pca"][:, 0], 4, labels=["A", "B", "C", "D"]))
        adata.obsm["X_test"] = np.ascontiguousarray(adata.obsm["X_pca"][:, :2])
        fv.tl.velocity_graph(adata)
        fv.tl.velocity_embedding(adata, basis="test")
        _CACHE["adata"] = adata
    return _CACHE["adata"].copy()


def _neighbours(adata, i):
    row = adata.obsp["distances"][i]
    return [int(j) for j in row.indices if j != i]


def _cos(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return 0.0 if na * nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)


def _literal_cbc(adata, cluster_key, edges, basis):
    X = np.asarray(adata.obsm[f"X_{basis}"], dtype=np.float64)
    V = np.asarray(adata.obsm[f"velocity_{basis}"], dtype=np.float64)
    labels = adata.obs[cluster_key].astype(str).values
    pooled, per_edge = [], {}
    for a, b in edges:
        scores = []
        for i in range(adata.n_obs):
            if labels[i] != a:
                continue
            targets = [j for j in _neighbours(adata, i) if labels[j] == b]
            if targets:
                scores.append(np.mean([_cos(X[j] - X[i], V[i]) for j in targets]))
        per_edge[f"{a} -> {b}"] = (np.mean(scores) if scores else np.nan, len(scores))
        pooled += scores
    return (np.mean(pooled) if pooled else np.nan), per_edge


def _literal_velocities(adata, use_velocity_genes=False, center=False):
    V = np.asarray(adata.layers["velocity"], dtype=np.float64)
    genes = [g for g in range(adata.n_vars) if not np.isnan(V[:, g]).any()]
    if use_velocity_genes:
        genes = [g for g in genes if adata.var["velocity_genes"].iloc[g]]
    V = V[:, genes]
    if center:
        V = np.array([row - row.mean() for row in V])
    return V


def _literal_consistency(adata, **kwargs):
    V = _literal_velocities(adata, **kwargs)
    unit = [v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else v * 0 for v in V]
    per_cell = []
    for i in range(adata.n_obs):
        mean_unit = np.mean([unit[j] for j in _neighbours(adata, i)], axis=0)
        per_cell.append(float(np.dot(unit[i], mean_unit)))
    return np.mean(per_cell), np.array(per_cell)


def _literal_coherence(adata, cluster_key):
    V = _literal_velocities(adata)
    labels = adata.obs[cluster_key].astype(str).values
    per_cluster = {}
    for c in sorted(set(labels)):
        scores = []
        for i in range(adata.n_obs):
            if labels[i] != c:
                continue
            same = [j for j in _neighbours(adata, i) if labels[j] == c]
            if same:
                scores.append(np.mean([_cos(V[i], V[j]) for j in same]))
        per_cluster[c] = np.mean(scores) if scores else np.nan
    values = [v for v in per_cluster.values() if not np.isnan(v)]
    return np.mean(values), per_cluster


def _snapshot(adata):
    return list(adata.obs.columns), sorted(adata.obsm.keys()), sorted(adata.uns.keys()), sorted(adata.layers.keys())


@pytest.mark.parametrize("pair_elements", [None, 7], ids=["one_block", "blocks_of_3_pairs"])
def test_cbc_matches_literal_loop(pair_elements, monkeypatch):
    from fluxvelo.metrics import _cbc

    if pair_elements:
        monkeypatch.setattr(_cbc, "_PAIR_ELEMENTS", pair_elements)
    adata = _data()
    before = _snapshot(adata)
    pooled, per_edge = fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=EDGES, basis="test")
    ref_pooled, ref_edges = _literal_cbc(adata, "clusters", EDGES, "test")
    assert pooled == pytest.approx(ref_pooled, abs=1e-10)
    assert list(per_edge.index) == list(ref_edges)
    for edge, (score, n_cells) in ref_edges.items():
        assert per_edge.loc[edge, "cbc"] == pytest.approx(score, abs=1e-10)
        assert per_edge.loc[edge, "n_cells"] == n_cells > 0
    # pooled over cells, i.e. the edge means weighted by their numbers of boundary cells
    weighted = (per_edge["cbc"] * per_edge["n_cells"]).sum() / per_edge["n_cells"].sum()
    assert pooled == pytest.approx(weighted, abs=1e-12)
    assert _snapshot(adata) == before
    pooled_str, _ = fv.metrics.cross_boundary_correctness(
        adata, cluster_key="clusters", edges=[f"{a} -> {b}" for a, b in EDGES], basis="X_test"
    )
    assert pooled_str == pooled


def test_cbc_reversed_edges_flip_sign_roughly():
    # the projection points along the lineage or against it: A->B and B->A cannot both be strongly positive
    adata = _data()
    _, per_edge = fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=EDGES, basis="test")
    assert per_edge.loc["A -> B", "cbc"] * per_edge.loc["B -> A", "cbc"] < 0.5


@pytest.mark.parametrize("center", [False, True])
def test_consistency_matches_literal_loop(center):
    adata = _data()
    V = adata.layers["velocity"].copy()
    V[5, 10] = np.nan  # a NaN drops the gene for every cell
    V[8] = 0.0  # a zero velocity scores 0
    V[9] = -V[9]  # a cell against its neighbours scores < 0
    adata.layers["velocity"] = V
    value = fv.metrics.consistency(adata, center=center, key_added="consistency")
    ref, ref_cells = _literal_consistency(adata, center=center)
    assert value == pytest.approx(ref, abs=1e-10)
    np.testing.assert_allclose(adata.obs["consistency"].values, ref_cells, atol=1e-10)
    assert adata.obs["consistency"].iloc[8] == 0.0 and ref_cells[9] < 0
    clipped = fv.metrics.consistency(adata, center=center, clip=True)
    assert clipped == pytest.approx(np.clip(ref_cells, 0, None).mean(), abs=1e-10)


def test_consistency_matches_scvelo_velocity_confidence():
    adata = _data()
    theirs = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity_confidence(theirs)
    before = _snapshot(adata)
    value = fv.metrics.consistency(adata, use_velocity_genes=True, center=True, clip=True)
    assert _snapshot(adata) == before  # nothing written without key_added
    assert value == pytest.approx(theirs.obs["velocity_confidence"].mean(), abs=1e-5)
    fv.metrics.consistency(adata, use_velocity_genes=True, center=True, clip=True, key_added="velocity_confidence")
    np.testing.assert_allclose(adata.obs["velocity_confidence"], theirs.obs["velocity_confidence"], atol=1e-5)
    # the benchmark default (all genes, uncentred, unclipped) is a different number here
    assert abs(fv.metrics.consistency(adata) - value) > 1e-4


def test_in_cluster_coherence_matches_literal_loop():
    adata = _data()
    value, per_cluster = fv.metrics.in_cluster_coherence(adata, cluster_key="clusters")
    ref, ref_clusters = _literal_coherence(adata, "clusters")
    assert value == pytest.approx(ref, abs=1e-10)
    for c, score in ref_clusters.items():
        assert per_cluster[c] == pytest.approx(score, abs=1e-10)


def test_small_clusters_and_isolated_edges_are_reported():
    adata = _data()
    labels = adata.obs["clusters"].astype(str).values.copy()
    labels[0] = "single"
    adata.obs["clusters"] = pd.Categorical(labels)
    with pytest.warns(UserWarning, match="single"):
        value, per_cluster = fv.metrics.in_cluster_coherence(adata, cluster_key="clusters")
    assert np.isnan(per_cluster["single"])
    assert value == pytest.approx(_literal_coherence(adata, "clusters")[0], abs=1e-10)
    # D and A sit at opposite ends of PC1: no cell of D borders A
    assert _literal_cbc(adata, "clusters", [("D", "A")], "test")[1]["D -> A"][1] == 0
    with pytest.warns(UserWarning, match="D -> A: no cell"):
        pooled, per_edge = fv.metrics.cross_boundary_correctness(
            adata, cluster_key="clusters", edges=[("A", "B"), ("D", "A")], basis="test"
        )
    assert per_edge.loc["D -> A", "n_cells"] == 0 and np.isnan(per_edge.loc["D -> A", "cbc"])
    assert pooled == per_edge.loc["A -> B", "cbc"]
    with pytest.raises(ValueError, match="No boundary cells"), pytest.warns(UserWarning):
        fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=[("D", "A")], basis="test")


def test_metrics_validate_inputs_and_leave_adata_unchanged():
    adata = _data()
    before = _snapshot(adata)
    cbc = fv.metrics.cross_boundary_correctness
    with pytest.raises(ValueError, match=r"Unknown cluster name\(s\) \['Nope'\].*'A', 'B', 'C', 'D'"):
        cbc(adata, cluster_key="clusters", edges=[("A", "Nope")], basis="test")
    with pytest.raises(KeyError, match="no column 'celltype'.*clusters"):
        cbc(adata, cluster_key="celltype", edges=EDGES, basis="test")
    with pytest.raises(KeyError, match="X_umap.*X_test"):
        cbc(adata, cluster_key="clusters", edges=EDGES, basis="umap")
    with pytest.raises(KeyError, match="velocity_pca.*velocity_embedding"):
        cbc(adata, cluster_key="clusters", edges=EDGES, basis="pca")
    with pytest.raises(ValueError, match="pair"):
        cbc(adata, cluster_key="clusters", edges=[("A", "B", "C")], basis="test")
    with pytest.raises(KeyError, match="layers has no 'vel2'"):
        fv.metrics.consistency(adata, vkey="vel2")
    with pytest.raises(KeyError, match="layers has no 'vel2'"):
        fv.metrics.in_cluster_coherence(adata, cluster_key="clusters", vkey="vel2")
    assert _snapshot(adata) == before

    bad = adata.copy()
    bad.obsm["X_test"][3, 1] = np.nan
    with pytest.raises(ValueError, match=r"obsm\['X_test'\] has NaN/inf in 1 cell"):
        cbc(bad, cluster_key="clusters", edges=EDGES, basis="test")
    bad = adata.copy()
    bad.obsm["velocity_test"][[3, 4]] = np.nan
    with pytest.raises(ValueError, match=r"velocity_test'\] has NaN/inf in 2 cell"):
        cbc(bad, cluster_key="clusters", edges=EDGES, basis="test")
    bad = adata.copy()
    bad.layers["velocity"] = np.full(adata.shape, np.nan, np.float32)
    with pytest.raises(ValueError, match="No genes left"):
        fv.metrics.consistency(bad)
    bad = adata.copy()
    dist = bad.obsp["distances"].tolil()
    dist.rows[7], dist.data[7] = [], []
    bad.obsp["distances"] = dist.tocsr()
    with pytest.raises(ValueError, match="1 cell.*no neighbours"):
        fv.metrics.consistency(bad, key_added="c")
    assert "c" not in bad.obs
    del bad.obsp["distances"]
    with pytest.raises(KeyError, match="obsp\\['distances'\\]"):
        fv.metrics.consistency(bad)
