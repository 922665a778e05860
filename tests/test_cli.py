"""The command line: ``fluxvelo demo`` and ``fluxvelo velocity`` end to end on tiny data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np

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
