"""fv.pl plots and fv.tl.vector_field: artists drawn, colours, errors, and the rebuilt field against the fit."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402
from scipy.optimize import brentq  # noqa: E402

import fluxvelo as fv  # noqa: E402
from fluxvelo.pl._grid import velocity_on_grid  # noqa: E402

COLORS = ["#1f0000", "#00aa00", "#0000bb", "#cc00cc", "#ddaa00", "#00cccc"]
_CACHE: dict = {}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _fitted():
    """Small simulation with a real (1-epoch) fluxvelo fit, velocity graph and UMAP projection (cached copy)."""
    if "fit" not in _CACHE:
        adata = fv.datasets.simulation(n_cells=200, n_genes=8, random_state=0)
        fv.pp.moments(adata)
        # read at the smoothed states, where fv.tl.vector_field rebuilds the field (not at the shared-state projection)
        fv.tl.velocity(adata, epochs=1, batch_size=64, state_rank=False)
        fv.tl.velocity_graph(adata)
        fv.tl.velocity_embedding(adata, basis="umap")
        _CACHE["fit"] = adata
    return _CACHE["fit"].copy()


@pytest.fixture
def adata():
    return _fitted()


def _softplus(x):
    return np.logaddexp(0.0, x)


def _literal_field(adata, gene, u, s):
    """The kinetic field of FLUX_MATCHING.md written out in NumPy, in original units and the reported time unit."""
    v = adata.var.loc[gene]
    su, ss = v["fit_scaling_u"], v["fit_scaling_s"]
    per_time = v["fit_time_scale"]  # the gene's time unit (tests/test_velocity.py checks its splicing clock)
    us, sc = u / su, s / ss
    drive = _softplus(v["fit_drive_a"] * us + v["fit_drive_b"] * sc + v["fit_drive_c"]) + 1e-6
    # the degradation rate the velocities are read with (tests/test_velocity.py checks how it is pooled)
    du, ds = (drive - v["fit_beta"] * us) * su, (v["fit_beta"] * us - v["fit_gamma_read"] * sc) * ss
    return du * per_time, ds * per_time, drive * su * per_time


def _velocity_genes(adata):
    return list(adata.var_names[adata.var["velocity_genes"].to_numpy(bool)])


# --------------------------------------------------------------------------------------------------- vector_field


def test_vector_field_reproduces_cell_velocities(adata):
    genes = _velocity_genes(adata)
    assert len(genes) >= 3
    for gene in genes:
        j = adata.var_names.get_loc(gene)
        vf = fv.tl.vector_field(adata, gene)
        du, ds, drive = vf.evaluate(adata.layers["Mu"][:, j], adata.layers["Ms"][:, j])
        scale_u, scale_s = adata.var.loc[gene, ["fit_scaling_u", "fit_scaling_s"]]
        # same float32 computation as the fit: equal up to the last bit of float32 arithmetic
        np.testing.assert_allclose(ds, adata.layers["velocity"][:, j], rtol=1e-6, atol=1e-6 * scale_s)
        np.testing.assert_allclose(du, adata.layers["velocity_u"][:, j], rtol=1e-6, atol=1e-6 * scale_u)
        np.testing.assert_allclose(drive, adata.layers["velocity_drive"][:, j], rtol=1e-6, atol=1e-6 * scale_u)


def test_vector_field_grid_matches_literal_formula(adata):
    gene = _velocity_genes(adata)[0]
    vf = fv.tl.vector_field(adata, gene, n_grid=12, margin=0.2)
    j = adata.var_names.get_loc(gene)
    u, s = adata.layers["Mu"][:, j], adata.layers["Ms"][:, j]
    assert vf.du.shape == vf.ds.shape == vf.drive.shape == (12, 12)
    assert vf.u[0] == pytest.approx(max(u.min() - 0.2 * np.ptp(u), 0)) and vf.u[-1] == pytest.approx(u.max() + 0.2 * np.ptp(u))
    assert vf.s[-1] == pytest.approx(s.max() + 0.2 * np.ptp(s))
    U, S = np.meshgrid(vf.u, vf.s, indexing="ij")
    du, ds, drive = _literal_field(adata, gene, U, S)
    np.testing.assert_allclose(vf.du, du, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vf.ds, ds, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vf.drive, drive, rtol=1e-4, atol=1e-5)
    vf2 = fv.tl.vector_field(adata, gene, u_range=(0, 2), s_range=(1, 3), n_grid=5)
    np.testing.assert_allclose(vf2.u, np.linspace(0, 2, 5))
    np.testing.assert_allclose(vf2.s, np.linspace(1, 3, 5))


def test_vector_field_nullclines(adata):
    gene = _velocity_genes(adata)[0]
    vf = fv.tl.vector_field(adata, gene)
    s0, u0 = vf.nullcline_ds.T
    _, ds, _ = _literal_field(adata, gene, u0, s0)
    np.testing.assert_allclose(ds, 0, atol=1e-9 * np.abs(vf.ds).max())
    assert vf.nullcline_du, "the du/dt = 0 nullcline crosses the data range of a fitted gene"
    for pts in vf.nullcline_du:
        du, _, _ = _literal_field(adata, gene, pts[:, 1], pts[:, 0])
        np.testing.assert_allclose(du, 0, atol=1e-6 * np.abs(vf.du).max())


def test_vector_field_two_du_branches(adata):
    """With a > beta the drive outgrows splicing: du/dt = 0 has two roots per s; both are found."""
    gene = _velocity_genes(adata)[0]
    adata.var.loc[gene, ["fit_drive_a", "fit_drive_b", "fit_drive_c", "fit_beta", "fit_gamma_read"]] = [4.0, 0.5, -4.0, 1.0, 0.5]
    adata.var.loc[gene, ["fit_scaling_u", "fit_scaling_s"]] = [2.0, 3.0]
    vf = fv.tl.vector_field(adata, gene, u_range=(0, 6), s_range=(0, 1.5))
    assert len(vf.nullcline_du) == 2
    lower, upper = sorted(vf.nullcline_du, key=lambda p: p[:, 1].mean())
    for s_val, u_lo, u_hi in [(lower[0, 0], lower[0, 1], None), (upper[-1, 0], None, upper[-1, 1])]:
        sp_ = s_val / 3.0  # scaled s

        def f(us, sp_=sp_):
            return _softplus(4 * us + 0.5 * sp_ - 4) + 1e-6 - us

        umin = (4 - 0.5 * sp_ + np.log(1 / 3)) / 4  # where d/du of f vanishes: sigmoid(.) = 1/4
        if u_lo is not None:
            assert u_lo == pytest.approx(2.0 * brentq(f, 0, umin), rel=1e-6)
        if u_hi is not None:
            assert u_hi == pytest.approx(2.0 * brentq(f, umin, 3.0), rel=1e-6)
    # ds/dt = 0: u = gamma / beta * (sigma_u / sigma_s) * s
    np.testing.assert_allclose(vf.nullcline_ds[:, 1], 0.5 * 2.0 / 3.0 * vf.nullcline_ds[:, 0])


def test_vector_field_errors(adata):
    with pytest.raises(KeyError, match="gene_1"):  # close matches are listed
        fv.tl.vector_field(adata, "gene_1x")
    bad = adata.copy()
    gene = _velocity_genes(bad)[0]
    bad.var.loc[gene, "fit_beta"] = np.nan  # a gene that was not fitted
    with pytest.raises(ValueError, match="no finite fitted parameters"):
        fv.tl.vector_field(bad, gene)
    bad = adata.copy()
    bad.uns["velocity_params"] = {"mode": "stochastic"}  # what scVelo writes
    with pytest.raises(ValueError, match="not fitted with fluxvelo"):
        fv.tl.vector_field(bad, gene)
    del bad.uns["velocity_params"]
    with pytest.raises(KeyError, match=r"fv.tl.velocity\(adata\)"):
        fv.tl.vector_field(bad, gene)
    with pytest.raises(ValueError, match="n_grid"):
        fv.tl.vector_field(adata, gene, n_grid=1)
    with pytest.raises(ValueError, match="u_range"):
        fv.tl.vector_field(adata, gene, u_range=(1, 0))


# ----------------------------------------------------------------------------------------------- grid vs scVelo


@pytest.mark.parametrize("n_obs", [120, 400])
def test_velocity_on_grid_matches_scvelo(n_obs):
    scv_grid = pytest.importorskip("scvelo.plotting.velocity_embedding_grid")
    rng = np.random.default_rng(n_obs)
    X = rng.normal(size=(n_obs, 2)) * [3.0, 1.0]
    V = np.column_stack([np.sin(X[:, 1]), np.cos(X[:, 0])]) + 0.1 * rng.normal(size=(n_obs, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_grid, ref_V = scv_grid.compute_velocity_on_grid(X, V, density=1, autoscale=True)
        ref_axes, ref_Vs = scv_grid.compute_velocity_on_grid(X, V, density=1, autoscale=False, adjust_for_stream=True)
    grid, V_grid = velocity_on_grid(X, V)
    np.testing.assert_allclose(grid, ref_grid, rtol=1e-12)
    np.testing.assert_allclose(V_grid, ref_V, rtol=1e-8, atol=1e-12)
    axes, Vs = velocity_on_grid(X, V, for_stream=True)
    np.testing.assert_allclose(np.stack(axes), ref_axes, rtol=1e-12)
    np.testing.assert_array_equal(np.isnan(Vs[0]), np.isnan(ref_Vs[0]))
    keep = ~np.isnan(ref_Vs[0])
    np.testing.assert_allclose(Vs[:, keep], ref_Vs[:, keep], rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------------ embedding plots


def _facecolor_counts(coll) -> dict:
    rgba = np.round(coll.get_facecolors()[:, :3], 4)  # alpha is the plot's
    uniq, counts = np.unique(rgba, axis=0, return_counts=True)
    return {tuple(c): n for c, n in zip(uniq, counts)}


def _expected_counts(adata, colors) -> dict:
    counts = adata.obs["clusters"].value_counts()
    cats = adata.obs["clusters"].cat.categories
    return {tuple(np.round(to_rgba(c)[:3], 4)): counts[cat] for cat, c in zip(cats, colors) if counts[cat] > 0}


def _cells(ax, n_obs):
    colls = [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets()) == n_obs]
    assert len(colls) == 1
    return colls[0]


def test_stream_plot(adata):
    n_cat = len(adata.obs["clusters"].cat.categories)
    adata.uns["clusters_colors"] = COLORS[:n_cat]
    ax = fv.pl.velocity_embedding_stream(adata, show=False)
    assert isinstance(ax, plt.Axes)
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert lines and len(lines[0].get_segments()) > 20  # streamlines were drawn
    cells = _cells(ax, adata.n_obs)
    np.testing.assert_allclose(np.sort(cells.get_offsets()[:, 0]), np.sort(adata.obsm["X_umap"][:, 0]))
    assert _facecolor_counts(cells) == _expected_counts(adata, COLORS)  # colours from uns
    labels = {t.get_text() for t in ax.texts}
    assert labels == set(adata.obs["clusters"].cat.categories)  # legend on data


def test_default_palette_and_uns_untouched(adata):
    adata.uns.pop("clusters_colors", None)
    fig, ax = plt.subplots()
    out = fv.pl.velocity_embedding_stream(adata, ax=ax, legend_loc="right margin")
    assert out is ax
    assert "clusters_colors" not in adata.uns
    n_cat = len(adata.obs["clusters"].cat.categories)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"][:n_cat]  # scanpy's default for few categories
    assert _facecolor_counts(_cells(ax, adata.n_obs)) == _expected_counts(adata, cycle)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(adata.obs["clusters"].cat.categories)


def test_grid_and_arrow_plots(adata):
    X, V = adata.obsm["X_umap"], adata.obsm["velocity_umap"]
    grid, _ = velocity_on_grid(X, V)
    ax = fv.pl.velocity_embedding_grid(adata, color="true_time")
    quivers = [c for c in ax.collections if isinstance(c, Quiver)]
    assert len(quivers) == 1 and quivers[0].N == len(grid)
    np.testing.assert_allclose(quivers[0].get_offsets(), grid)
    assert len(ax.figure.axes) == 2  # continuous colour: a colourbar

    n_cat = len(adata.obs["clusters"].cat.categories)
    adata.uns["clusters_colors"] = COLORS[:n_cat]
    ax = fv.pl.velocity_embedding(adata, legend_loc=None)
    (q,) = [c for c in ax.collections if isinstance(c, Quiver)]
    assert q.N == adata.n_obs
    np.testing.assert_allclose(q.get_offsets(), X)
    codes = adata.obs["clusters"].cat.codes.to_numpy()
    np.testing.assert_allclose(q.get_facecolors(), [to_rgba(COLORS[c]) for c in codes])
    # arrows keep the directions and relative lengths of obsm['velocity_umap']
    ratio = q.U / V[:, 0]
    np.testing.assert_allclose(ratio[np.abs(V[:, 0]) > 1e-12], ratio[np.abs(V[:, 0]) > 1e-12][0], rtol=1e-6)
    ax = fv.pl.velocity_embedding(adata, density=0.5)
    (q,) = [c for c in ax.collections if isinstance(c, Quiver)]
    assert q.N == adata.n_obs // 2


def test_embedding_plot_errors(adata):
    no_proj = adata.copy()
    del no_proj.obsm["velocity_umap"]
    for plot in (fv.pl.velocity_embedding_stream, fv.pl.velocity_embedding_grid, fv.pl.velocity_embedding):
        with pytest.raises(KeyError, match=r"fv.tl.velocity_embedding\(adata, basis='umap'"):
            plot(no_proj)
    del no_proj.layers["velocity"]
    with pytest.raises(KeyError, match=r"fv.tl.velocity\(adata\)"):
        fv.pl.velocity_embedding_stream(no_proj)
    with pytest.raises(KeyError, match="X_tsne"):
        fv.pl.velocity_embedding_stream(adata, basis="tsne")
    with pytest.raises(KeyError, match="neither a column"):
        fv.pl.velocity_embedding_stream(adata, color="no_such_key")


def test_show_and_save(adata, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    fv.pl.velocity_embedding_stream(adata)  # Agg, non-interactive: never shown
    fv.pl.loss_curve(adata, show=None)
    assert calls == []
    fv.pl.loss_curve(adata, show=True)
    assert calls == [1]
    path = tmp_path / "stream.png"
    fv.pl.velocity_embedding_stream(adata, save=path)
    assert path.stat().st_size > 1000


# --------------------------------------------------------------------------------------------------- phase portrait


def test_phase_portrait(adata):
    gene = _velocity_genes(adata)[1]
    j = adata.var_names.get_loc(gene)
    n_cat = len(adata.obs["clusters"].cat.categories)
    adata.uns["clusters_colors"] = COLORS[:n_cat]
    ax = fv.pl.phase_portrait(adata, gene)
    cells = _cells(ax, adata.n_obs)
    xy = cells.get_offsets()
    order = np.lexsort((xy[:, 1], xy[:, 0]))
    ref = np.column_stack([adata.layers["Ms"][:, j], adata.layers["Mu"][:, j]])
    np.testing.assert_allclose(xy[order], ref[np.lexsort((ref[:, 1], ref[:, 0]))], rtol=1e-6)
    assert _facecolor_counts(cells) == _expected_counts(adata, COLORS)
    assert any(isinstance(c, LineCollection) for c in ax.collections)  # field streamlines
    vf = fv.tl.vector_field(adata, gene)
    du_lines = [ln for ln in ax.lines if ln.get_gid() == "nullcline_du"]
    ds_lines = [ln for ln in ax.lines if ln.get_gid() == "nullcline_ds"]
    assert len(du_lines) == len(vf.nullcline_du) >= 1 and len(ds_lines) == 1
    np.testing.assert_allclose(np.column_stack(ds_lines[0].get_data()), vf.nullcline_ds)
    assert ax.get_xlabel().startswith("spliced") and ax.get_ylabel().startswith("unspliced")

    ax = fv.pl.phase_portrait(adata, gene, field=False, nullclines=False)
    assert not ax.lines and not any(isinstance(c, LineCollection) for c in ax.collections)


def test_phase_portrait_errors(adata):
    with pytest.raises(KeyError, match="Close matches"):
        fv.pl.phase_portrait(adata, "gene_1x")
    scv_like = adata.copy()
    scv_like.uns["velocity_params"] = {"mode": "stochastic"}
    gene = _velocity_genes(adata)[0]
    with pytest.raises(ValueError, match="not fitted with fluxvelo"):
        fv.pl.phase_portrait(scv_like, gene)
    ax = fv.pl.phase_portrait(scv_like, gene, field=False, nullclines=False)  # cells only: any velocity works
    assert _cells(ax, adata.n_obs) is not None
    del scv_like.layers["Mu"]
    with pytest.raises(KeyError, match=r"fv.pp.moments"):
        fv.pl.phase_portrait(scv_like, gene, field=False, nullclines=False)


# ----------------------------------------------------------------------------------------------------- results


def _bar_heights(ax):
    return [[rect.get_height() for rect in container] for container in ax.containers]


def test_cbc_bars_inputs():
    edges = ["A -> B", "B -> C", "B -> D"]
    results = {"fluxvelo": {"A -> B": 0.5, "B -> C": -0.2, "B -> D": 0.1}, "scVelo": pd.Series([0.3, 0.4], index=edges[:2])}
    ax = fv.pl.cbc_bars(results)
    assert [t.get_text() for t in ax.get_xticklabels()] == edges
    heights = _bar_heights(ax)
    assert heights[0] == [0.5, -0.2, 0.1]
    assert heights[1][:2] == [0.3, 0.4] and np.isnan(heights[1][2])  # missing edge: no bar
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fluxvelo", "scVelo"]
    # bars of one edge sit side by side around its tick
    x0 = [container[0].get_x() + container[0].get_width() / 2 for container in ax.containers]
    assert x0[0] < 0 < x0[1]

    tidy = pd.DataFrame(
        {"method": ["m1", "m1", "m2", "m2"], "edge": [("A", "B"), ("B", "C")] * 2, "cbc": [0.1, 0.2, 0.3, 0.4]}
    )
    ax = fv.pl.cbc_bars(tidy, palette={"m1": "red", "m2": "blue"})
    assert _bar_heights(ax) == [[0.1, 0.2], [0.3, 0.4]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A -> B", "B -> C"]
    assert to_rgba(ax.containers[1][0].get_facecolor()) == to_rgba("blue")

    with pytest.raises(ValueError, match="'method', 'edge', 'cbc'"):
        fv.pl.cbc_bars(pd.DataFrame({"method": ["m"], "cbc": [1.0]}))
    with pytest.raises(TypeError, match="must be a dict or Series"):
        fv.pl.cbc_bars({"m": [0.1, 0.2]})


def test_cbc_bars_from_metric(adata):
    edges = [tuple(e) for e in adata.uns["true_edges"]]
    pooled, per_edge = fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=edges)
    ax = fv.pl.cbc_bars({"fluxvelo": (pooled, per_edge), "copy": per_edge})
    assert [t.get_text() for t in ax.get_xticklabels()] == list(per_edge.index)
    np.testing.assert_allclose(_bar_heights(ax)[0], per_edge["cbc"].to_numpy())
    np.testing.assert_allclose(_bar_heights(ax)[1], per_edge["cbc"].to_numpy())
    assert ax.get_legend().get_texts()[0].get_text() == f"fluxvelo ({pooled:.3f})"


def test_loss_curve(adata):
    ax = fv.pl.loss_curve(adata)
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_ydata(), adata.uns["velocity_params"]["loss_history"])
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, len(line.get_ydata()) + 1))
    bad = adata.copy()
    bad.uns["velocity_params"] = {"mode": "stochastic"}
    with pytest.raises(KeyError, match="not fitted by fluxvelo"):
        fv.pl.loss_curve(bad)
    with pytest.raises(KeyError, match=r"Run fv.tl.velocity\(adata\)"):
        fv.pl.loss_curve(bad, key="other")


def _legend_labels(ax):
    return [t.get_text() for legend in (ax.get_legend(), *[a for a in ax.artists]) if legend is not None
            for t in getattr(legend, "get_texts", lambda: [])()]  # fmt: skip


def test_phase_portrait_legend_names_only_drawn_nullclines(adata, monkeypatch):
    import dataclasses

    from fluxvelo.pl import _phase

    gene = _velocity_genes(adata)[1]
    ax = fv.pl.phase_portrait(adata, gene)
    assert {"du/dt = 0", "ds/dt = 0"} <= set(_legend_labels(ax))
    plt.close("all")
    real = _phase.vector_field
    monkeypatch.setattr(_phase, "vector_field", lambda *a, **k: dataclasses.replace(real(*a, **k), nullcline_du=[]))
    ax = fv.pl.phase_portrait(adata, gene)
    labels = _legend_labels(ax)
    assert "du/dt = 0" not in labels and "ds/dt = 0" in labels
    assert not [ln for ln in ax.lines if ln.get_gid() == "nullcline_du"]


def test_loss_curve_has_whole_epoch_ticks(adata):
    few = adata.copy()
    few.uns["velocity_params"] = {**adata.uns["velocity_params"], "loss_history": [3.0, 2.0, 1.5]}
    ax = fv.pl.loss_curve(few)
    ax.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
