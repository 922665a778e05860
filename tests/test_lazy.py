"""Dask-backed AnnData: the lazy paths give the in-memory results, keep their outputs lazy and fail clearly."""

from __future__ import annotations

import platform

import numpy as np
import pytest

import fluxvelo as fv
from fluxvelo._utils import to_dense
from fluxvelo.tl._fit import BatchPlan

da = pytest.importorskip("dask.array", reason="the Dask paths need dask: pip install 'fluxvelo[dask]'")

LAYERS = ("spliced", "unspliced", "Ms", "Mu")
OUTPUTS = ("velocity", "velocity_u", "velocity_drive")


@pytest.fixture(scope="module")
def prepared():
    adata = fv.datasets.simulation(n_cells=500, n_genes=30, random_state=3)
    fv.pp.recipe_flux(adata, n_top_genes=None, embedding=None)
    return adata


def test_batch_plan_reads_only_the_cells_it_draws():
    plan = BatchPlan.make(10_000, epochs=None, n_steps=5, batch_size=32, remainder="spread")
    rng = np.random.default_rng(0)
    cells = plan.cells(rng)
    drawn = np.concatenate(next(plan.epochs(rng)))  # rng was left as it was: the same draws follow
    assert cells.size <= 5 * 33 and np.array_equal(cells, np.sort(drawn))  # 5 batches of 32 or 33 (spread)
    whole = BatchPlan.make(100, epochs=2, n_steps=None, batch_size=32, remainder="spread")
    assert np.array_equal(whole.cells(rng), np.arange(100))


def lazy_copy(adata, layers=LAYERS, chunks=(180, 7)):
    """A copy whose ``layers`` are Dask arrays with chunks that cut through cells and genes."""
    out = adata.copy()
    for name in layers:
        out.layers[name] = da.from_array(to_dense(adata.layers[name]), chunks=chunks)
    return out


def assert_same_fit(eager, lazy):
    for name in OUTPUTS:
        assert isinstance(lazy.layers[name], da.Array), f"{name} was materialised"
        got, want = lazy.layers[name].compute(), eager.layers[name]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.nanmax(np.abs(want)))
    for column in eager.var.columns:  # the fit and its stationarity (over the same cells) are identical
        if column.startswith("fit_") or column == "velocity_genes":
            np.testing.assert_array_equal(lazy.var[column].to_numpy(float), eager.var[column].to_numpy(float))


@pytest.mark.parametrize(
    "options",
    # with fewer cells seen than there are, lazy layers' shared clock is read over the cells the fit saw
    [{}, {"turnover": "ramp"}, {"velocity_genes": "fit"},
     {"n_steps": 14, "batch_size": 32, "turnover": "ramp", "shared_clock": False}],  # fmt: skip
    ids=["default", "balanced", "fit_genes", "fewer_cells_than_data"],
)
def test_velocity_on_dask_layers_equals_in_memory(prepared, options):
    if options.get("turnover") == "ramp":  # the balanced fit: its moments are read in blocks of genes
        options = {**options, "turnover": np.linspace(-1, 1, prepared.n_obs)}
    eager, lazy = prepared.copy(), lazy_copy(prepared)
    fv.tl.velocity(eager, state_rank=False, **options)  # lazy layers are read at the smoothed states as given
    fv.tl.velocity(lazy, **options)
    assert "state_rank" not in lazy.uns["velocity_params"]
    assert_same_fit(eager, lazy)
    assert eager.uns["velocity_params"]["steps_taken"] == lazy.uns["velocity_params"]["steps_taken"]
    assert lazy.uns["velocity_params"]["stationarity_median"] == eager.uns["velocity_params"]["stationarity_median"]


class CountingArray:
    """An array for ``da.from_array`` that counts how often each of its entries is read."""

    def __init__(self, x):
        self.x, self.shape, self.dtype, self.ndim = x, x.shape, x.dtype, x.ndim
        self.reads = np.zeros(x.shape, np.int64)

    def __getitem__(self, key):
        self.reads[key] += 1
        return self.x[key]


def test_velocity_reads_the_smoothed_layers_once(prepared):
    """The checks, the scales, the fit's cells, the balance moments and scVelo's quantile fit come from one pass
    over the lazy layers, and the stationarity from the cells the fit saw; the fields themselves stay lazy."""
    lazy = prepared.copy()
    counted = {}
    for name in ("Ms", "Mu"):
        counted[name] = CountingArray(to_dense(prepared.layers[name]))
        lazy.layers[name] = da.from_array(counted[name], chunks=(180, 7), asarray=True)
    for array in counted.values():
        array.reads[:] = 0
    fv.tl.velocity(lazy, turnover=np.linspace(-1, 1, prepared.n_obs))
    assert lazy.uns["velocity_params"]["velocity_genes"] == "steady_state"
    for name, array in counted.items():
        assert array.reads.min() == 1 and array.reads.max() == 1, f"layers['{name}'] read {array.reads.max()} times"


def test_moments_graph_and_embedding_on_dask_layers(prepared):
    eager, lazy = prepared.copy(), lazy_copy(prepared, layers=("spliced", "unspliced"))
    for adata in (eager, lazy):
        fv.pp.moments(adata)
    for name in ("Ms", "Mu"):
        assert isinstance(lazy.layers[name], da.Array)
        np.testing.assert_array_equal(lazy.layers[name].compute(), eager.layers[name])
    for adata in (eager, lazy):
        fv.tl.velocity(adata, state_rank=False)
        fv.tl.velocity_graph(adata)
        fv.tl.velocity_embedding(adata, basis="pca")
    np.testing.assert_allclose(lazy.uns["velocity_graph"].toarray(), eager.uns["velocity_graph"].toarray(), atol=1e-6)
    np.testing.assert_allclose(lazy.obsm["velocity_pca"], eager.obsm["velocity_pca"], rtol=1e-5, atol=1e-7)


def test_lazy_inputs_fail_clearly_and_leave_adata_unchanged(prepared):
    bad = lazy_copy(prepared)
    ms = to_dense(prepared.layers["Ms"]).copy()
    ms[3, 4] = np.nan
    bad.layers["Ms"] = da.from_array(ms, chunks=(180, 7))
    keys = set(bad.layers.keys())
    with pytest.raises(ValueError, match=r"layers\['Ms'\] holds 1 NaN"):
        fv.tl.velocity(bad)
    assert set(bad.layers.keys()) == keys and "velocity_genes" not in bad.var

    raw = lazy_copy(prepared, layers=())
    counts = np.random.default_rng(0).poisson(2.0, prepared.shape).astype(np.float32)
    raw.layers["spliced"] = da.from_array(counts, chunks=(180, 7))
    with pytest.raises(ValueError, match="raw counts; normalise them"):
        fv.pp.moments(raw)

    lazy = lazy_copy(prepared)
    with pytest.raises(ValueError, match="state_rank=30 needs the smoothed layers in memory"):
        fv.tl.velocity(lazy, state_rank=30)
    assert "velocity" not in lazy.layers and "velocity_genes" not in lazy.var


def test_velocity_from_zarr_store_on_a_two_worker_cluster(prepared, tmp_path):
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed")
    eager = prepared.copy()
    fv.tl.velocity(eager, state_rank=False)
    lazy = prepared.copy()
    for name in LAYERS:
        da.from_array(to_dense(prepared.layers[name]), chunks=(180, 7)).to_zarr(str(tmp_path / name))
        lazy.layers[name] = da.from_zarr(str(tmp_path / name))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            fv.tl.velocity(lazy)
            assert_same_fit(eager, lazy)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("recurse", [1, 2])
def test_velocity_graph_in_blocks_of_cells_and_genes_equals_one_block(prepared, monkeypatch, backend, recurse):
    from fluxvelo import _lazy
    from fluxvelo.tl import _graph

    eager = prepared.copy()
    fv.tl.velocity(eager)
    eager.layers["velocity"][:5, np.flatnonzero(eager.var["velocity_genes"])[1]] = np.nan  # a gene both drop
    lazy = lazy_copy(eager, layers=("Ms", "velocity"))
    pairs = int(_graph.neighbourhood(_graph.knn_indices(eager.obsp["distances"]), recurse).nnz)
    monkeypatch.setattr(_graph, "LAZY_GRAPH_PAIRS", pairs // 3)  # four blocks of cells, the last one shorter
    monkeypatch.setattr(_lazy, "BLOCK_BYTES", 8 * 4 * eager.n_obs)  # four genes per block
    for adata in (eager, lazy):
        fv.tl.velocity_graph(adata, backend=backend, n_recurse_neighbors=recurse)
    assert len(_graph._row_blocks(_graph.knn_indices(eager.obsp["distances"]), recurse, backend == "numba")) == 4

    def signed(adata):
        return (adata.uns["velocity_graph"] - adata.uns["velocity_graph_neg"]).toarray()

    assert lazy.uns["velocity_graph"].nnz > 0 and lazy.uns["velocity_graph_neg"].nnz > 0
    np.testing.assert_allclose(signed(lazy), signed(eager), rtol=0, atol=1e-6)
    nonzero = lambda a: (a.uns["velocity_graph"] + a.uns["velocity_graph_neg"]).nnz  # noqa: E731
    assert nonzero(lazy) == pytest.approx(nonzero(eager), abs=2)  # only an exact zero may fall on either side
    np.testing.assert_allclose(lazy.obs["velocity_self_transition"], eager.obs["velocity_self_transition"], atol=1e-6)


@pytest.mark.filterwarnings("ignore:Writing zarr v2")
def test_read_lazy_store_gives_the_in_memory_results(prepared, tmp_path):
    pytest.importorskip("xarray", reason="anndata's read_lazy needs xarray: pip install 'fluxvelo[dask]'")
    from anndata.experimental import read_lazy

    eager = prepared.copy()
    eager.write_zarr(tmp_path / "data.zarr")
    lazy = read_lazy(tmp_path / "data.zarr")  # layers and the cells x cells graphs as Dask arrays
    assert isinstance(lazy.obsp["distances"], da.Array)
    edges = [tuple(map(str, edge)) for edge in prepared.uns["true_edges"]]
    scores = []
    for adata in (eager, lazy):
        fv.tl.velocity(adata, state_rank=False)
        fv.tl.velocity_graph(adata)
        fv.tl.velocity_embedding(adata, basis="pca")
        scores.append(fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=edges, basis="pca")[0])
    got, want = lazy.layers["velocity"].compute(), eager.layers["velocity"]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.nanmax(np.abs(want)))
    signed = [(a.uns["velocity_graph"] - a.uns["velocity_graph_neg"]).toarray() for a in (lazy, eager)]
    np.testing.assert_allclose(*signed, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lazy.obsm["velocity_pca"], eager.obsm["velocity_pca"], rtol=1e-4, atol=1e-6)
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_memory_gives_freed_heap_back():
    from fluxvelo._lazy import release_memory

    small = [np.ones(64) for _ in range(200_000)]  # heap allocations, too small to be mapped separately
    del small
    assert release_memory()


@pytest.mark.parametrize(
    ("span_genes", "size", "reads_expected"),
    [
        (5, 2, [[0, 1, 2, 3, 4], [6, 7], [11, 12, 13, 14], [20, 22]]),  # one whole chunk of columns per read
        (3, 2, [[0, 1], [2, 3], [4], [6, 7], [11, 12], [13, 14], [20, 22]]),  # chunks too wide: blocks of 2
        (100, 8, [[0, 1, 2, 3, 4, 6, 7], [11, 12, 13, 14, 20, 22]]),  # whole chunks merged up to 8 genes
    ],
)
def test_column_blocks_read_whole_chunks_of_columns_once(monkeypatch, span_genes, size, reads_expected):
    from fluxvelo import _lazy

    x = np.arange(60 * 23, dtype=np.float32).reshape(60, 23)
    lazy = da.from_array(x, chunks=(25, 5))  # chunks of columns 0-4, 5-9, 10-14, 15-19, 20-22
    genes = np.array([0, 1, 2, 3, 4, 6, 7, 11, 12, 13, 14, 20, 22])
    reads, read = [], _lazy._read

    def counted(array, cols, dtype, buffer=None):
        reads.append(np.arange(x.shape[1])[cols].tolist())
        return read(array, cols, dtype, buffer)

    monkeypatch.setattr(_lazy, "_read", counted)
    monkeypatch.setattr(_lazy, "SPAN_BYTES", 4 * 60 * span_genes)
    blocks = list(_lazy.column_blocks([lazy], genes, size))
    assert reads == reads_expected
    assert np.concatenate([block for block, _ in blocks]).tolist() == genes.tolist()
    assert all(block.size <= size for block, _ in blocks)
    for block, (dense,) in blocks:
        np.testing.assert_array_equal(dense, x[:, block])
        assert dense.flags.c_contiguous  # a strided block would slow every operation on it
