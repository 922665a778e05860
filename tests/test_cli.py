"""The command line: ``fluxvelo demo`` and ``fluxvelo velocity`` end to end on tiny data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

import fluxvelo as fv
from fluxvelo.__main__ import main


def test_demo_writes_h5ad_figure_and_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n-cells", "200", "--n-genes", "20"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cells"] == 200 and -1 <= summary["cosine_to_true_velocity"] <= 1
    assert (tmp_path / "velocity.png").stat().st_size > 10_000
    back = ad.read_h5ad(tmp_path / "velocity.h5ad")
    assert np.isfinite(back.layers["velocity"][:, back.var["velocity_genes"].to_numpy()]).all()
    assert '"consistency"' in capsys.readouterr().out


def test_velocity_command_round_trip(tmp_path):
    adata = fv.datasets.simulation(n_cells=150, n_genes=15, random_state=3)
    adata.uns.pop("true_edges")
    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(src)
    assert main(["velocity", str(src), "--out", str(out), "--preprocess", "--epochs", "1", "--seed", "2"]) == 0
    fitted = ad.read_h5ad(out)
    assert fitted.uns["velocity_params"]["random_state"] == 2 and fitted.uns["velocity_params"]["epochs"] == 1
    assert "velocity" in fitted.layers and "Ms" in fitted.layers


def _sim_file(tmp_path, *, moments: bool, n_cells: int = 120):
    adata = fv.datasets.simulation(n_cells=n_cells, n_genes=12, random_state=1)
    adata.uns.pop("true_edges")
    if moments:
        fv.pp.recipe_flux(adata, embedding=None, n_top_genes=None)
        adata.obsm["X_umap"] = adata.obsm["X_pca"][:, :2].copy()
    path = tmp_path / ("moments.h5ad" if moments else "raw.h5ad")
    adata.write_h5ad(path)
    return path


def _error(capsys, argv, *, verbose_raises=True):
    """Run the CLI expecting a user error: exit status 1, one stderr line, no traceback; --verbose re-raises."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("fluxvelo velocity: error: ")
    if verbose_raises:
        from fluxvelo._cli import UsageError

        with pytest.raises(UsageError):
            main([*argv, "--verbose"])
    return lines[0]


def test_missing_file_is_one_line(tmp_path, capsys):
    line = _error(capsys, ["velocity", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "o.h5ad")])
    assert "nope.h5ad' does not exist" in line


def test_not_h5ad_is_one_line(tmp_path, capsys):
    bad = tmp_path / "counts.csv"
    bad.write_text("cell,gene\n1,2\n")
    line = _error(capsys, ["velocity", str(bad), "--out", str(tmp_path / "o.h5ad")])
    assert "is not an .h5ad file" in line


def test_missing_layers_name_preprocess(tmp_path, capsys):
    raw = _sim_file(tmp_path, moments=False)
    line = _error(capsys, ["velocity", str(raw), "--out", str(tmp_path / "o.h5ad")])
    assert "no layer 'Ms' and 'Mu'" in line and "--preprocess" in line


def test_preprocess_without_raw_layers(tmp_path, capsys):
    src = tmp_path / "x.h5ad"
    ad.AnnData(np.ones((5, 3), dtype=np.float32)).write_h5ad(src)
    line = _error(capsys, ["velocity", str(src), "--out", str(tmp_path / "o.h5ad"), "--preprocess"])
    assert "'spliced' and 'unspliced'" in line and "--preprocess needs" in line


def test_missing_basis_and_color(tmp_path, capsys):
    src = _sim_file(tmp_path, moments=True)
    line = _error(capsys, ["velocity", str(src), "--out", str(tmp_path / "o.h5ad"), "--basis", "tsne"])
    assert "obsm['X_tsne']" in line and "umap" in line
    line = _error(capsys, ["velocity", str(src), "--out", str(tmp_path / "o.h5ad"), "--basis", "umap", "--color", "nope"])
    assert "obs column 'nope'" in line
    line = _error(capsys, ["velocity", str(src), "--out", str(tmp_path / "o.h5ad"), "--color", "clusters"])
    assert "needs --basis" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    src = _sim_file(tmp_path, moments=True)
    line = _error(capsys, ["velocity", str(src), "--out", str(tmp_path / "o.h5ad"), "--device", "cuda"])
    assert "--device cuda" in line and "CUDA" in line and not (tmp_path / "o.h5ad").exists()


def test_errors_come_before_any_work(tmp_path, capsys, monkeypatch):
    from fluxvelo import tl

    monkeypatch.setattr(tl, "velocity", lambda *a, **k: pytest.fail("the fit started"))
    src = _sim_file(tmp_path, moments=True)
    _error(capsys, ["velocity", str(src), "--out", str(tmp_path / "o.h5ad"), "--device", "nonsense"],
           verbose_raises=False)  # fmt: skip
    line = _error(capsys, ["velocity", str(src), "--out", str(tmp_path / "o.h5ad"), "--n-jobs", "0"],
                  verbose_raises=False)  # fmt: skip
    assert "--n-jobs" in line


def test_velocity_with_basis_steps_and_compact_output(tmp_path, monkeypatch):
    monkeypatch.setattr(fv.settings, "_n_jobs", None)  # restored after the command sets it
    src, out = _sim_file(tmp_path, moments=True), tmp_path / "out" / "fit.h5ad"
    argv = ["velocity", str(src), "--out", str(out), "--n-steps", "3", "--basis", "umap", "--color", "clusters",
            "--compact", "--n-jobs", "1"]  # fmt: skip
    assert main(argv) == 0
    fitted = ad.read_h5ad(out)
    assert fitted.uns["velocity_params"]["steps_taken"] == 3
    assert "velocity_graph" in fitted.uns and "velocity_umap" in fitted.obsm
    assert "Ms" not in fitted.layers and "Mu" not in fitted.layers
    floats = [fitted.layers[k] for k in fitted.layers] + [fitted.obsm[k] for k in fitted.obsm] + [fitted.X]
    assert all(a.dtype == np.float32 for a in floats if np.issubdtype(a.dtype, np.floating))
    assert fitted.uns["velocity_graph"].dtype == np.float32
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from fluxvelo.__main__ import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\n" \
           "print('torch' in sys.modules, 'scanpy' in sys.modules)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "benchmark" in out and "gen" in out and out.strip().endswith("False False")


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from fluxvelo._utils import progress_disabled

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(fv.settings, "progress_bar", True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a pipe
    assert progress_disabled()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not progress_disabled()
    monkeypatch.setattr(fv.settings, "progress_bar", False)
    assert progress_disabled()
