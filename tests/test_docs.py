"""The documentation: tutorials run end to end, the Sphinx build passes with warnings as errors, the API
reference covers every public name, and the FAQ quotes the error messages that the code really prints."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import DATA_DIR

import fluxvelo as fv

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# Subpackages whose public names (``__all__``) the API reference must document.
SUBPACKAGES = ["pp", "tl", "pl", "metrics", "datasets", "gen", "flux", "fields", "benchmark"]
# Files in the shared data folder that a notebook needs; notebooks not listed need none.
NOTEBOOK_DATA = {"01_pancreas.ipynb": ["pancreas_3696x2000.h5ad"]}
CELL_TIMEOUT_S = 1800


def _public(sub: str) -> dict[str, object]:
    module = importlib.import_module(f"fluxvelo.{sub}")
    return {name: getattr(module, name) for name in module.__all__}


# --- tutorials -----------------------------------------------------------------------------------------------


def test_tutorials_exist():
    assert (TUTORIALS / "01_pancreas.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_with_figures(path):
    """The docs render stored outputs (no execution at build time), so each notebook must be saved after one
    clean top-to-bottom run: every code cell executed in order, no errors, figures present."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, f"{path.name} has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{path.name}: some code cells were not executed; run it and save with outputs"
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: cells not run once, top to bottom: {counts}"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{path.name} was saved with an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no figure in its outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    """Run the notebook in a fresh kernel in a temporary folder; any cell error fails the test."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for name in NOTEBOOK_DATA.get(path.name, []):
        if not (DATA_DIR / name).exists():
            pytest.skip(
                f"{path.name} needs {name}, not found in {DATA_DIR}; set FLUXVELO_DATA_DIR to the folder that holds it"
            )
    # The kernel inherits this environment: data from the shared folder, downloads and caches in tmp.
    monkeypatch.setenv("FLUXVELO_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("FLUXVELO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"


# --- API reference -------------------------------------------------------------------------------------------


def test_api_pages_cover_every_subpackage():
    """Each subpackage has a page with its automodule (members from ``__all__``); data, which autodoc skips
    without a docstring, is listed with autodata."""
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert conf["autodoc_default_options"].get("members") is True
    api_index = (DOCS / "api.md").read_text(encoding="utf-8")
    for sub in SUBPACKAGES:
        page = DOCS / "api" / f"{sub}.md"
        assert page.exists(), f"no API page for fluxvelo.{sub}"
        text = page.read_text(encoding="utf-8")
        assert re.search(rf"^\.\. automodule:: fluxvelo\.{sub}\s*$", text, re.M), f"{page.name} lacks its automodule"
        assert f"api/{sub}\n" in api_index, f"api.md does not list api/{sub}"
        for name, obj in _public(sub).items():
            if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)):
                assert f".. autodata:: fluxvelo.{sub}.{name}" in text, f"fluxvelo.{sub}.{name} not in {page.name}"


# --- Sphinx build --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    """Build the docs once: ``sphinx-build -W -b html docs <tmp>/html``."""
    for module in ("sphinx", "myst_nb", "numpydoc", "furo"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[docs]')")
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert conf["nb_execution_mode"] == "off", "the docs build must not execute notebooks"
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
    return out


def test_docs_build_without_warnings(html):
    assert (html / "index.html").exists()
    for page in ("installation", "quickstart", "method", "anndata", "interoperability", "benchmark", "faq", "api"):
        assert (html / f"{page}.html").exists(), f"{page}.html was not built"
    for nb in NOTEBOOKS:
        page = html / "tutorials" / f"{nb.stem}.html"
        assert page.exists(), f"tutorial {nb.name} is not in the docs"
    # the stored figures are rendered (myst-nb writes them as image files)
    tutorial = (html / "tutorials" / "01_pancreas.html").read_text(encoding="utf-8")
    assert "<img" in tutorial


def test_every_public_name_in_api_reference(html):
    from sphinx.util.inventory import InventoryFile

    with open(html / "objects.inv", "rb") as fh:
        inventory = InventoryFile.load(fh, "", lambda base, uri: uri)
    data = getattr(inventory, "data", inventory)  # Sphinx >= 8.2 wraps the mapping
    documented = {name for entries in data.values() for name in entries}
    public = [f"fluxvelo.{sub}.{name}" for sub in SUBPACKAGES for name in _public(sub)]
    missing = [name for name in public if name not in documented]
    assert not missing, f"not in the API reference: {missing}"


# --- FAQ: the messages are the code's ------------------------------------------------------------------------

FAQ = (DOCS / "faq.md").read_text(encoding="utf-8")
PANCREAS_CLUSTERS = ["Ductal", "Ngn3 low EP", "Ngn3 high EP", "Pre-endocrine", "Beta", "Alpha", "Delta", "Epsilon"]


def _error(func, *args, **kwargs) -> str:
    """``'<Type>: <message>'`` as Python prints an uncaught exception."""
    with pytest.raises(Exception) as info:
        func(*args, **kwargs)
    err = info.value
    text = repr(err.args[0]) if isinstance(err, KeyError) else str(err)  # KeyError prints its message's repr
    return f"{type(err).__name__}: {text}"


def _counts(n_obs=30, n_vars=12, seed=0) -> AnnData:
    rng = np.random.default_rng(seed)
    adata = AnnData(X=rng.poisson(3, (n_obs, n_vars)).astype(np.float32))
    adata.layers["spliced"] = rng.poisson(3, (n_obs, n_vars)).astype(np.float32)
    adata.layers["unspliced"] = rng.poisson(2, (n_obs, n_vars)).astype(np.float32)
    return adata


def _with_moments(seed=0) -> AnnData:
    adata = _counts(seed=seed)
    adata.layers["Ms"] = adata.layers["spliced"] + 0.5
    adata.layers["Mu"] = adata.layers["unspliced"] + 0.5
    return adata


def _in_faq(message: str) -> None:
    assert message in FAQ, f"docs/faq.md does not quote the message the code prints:\n{message}"


def test_faq_missing_moments():
    _in_faq(_error(fv.tl.velocity, _counts()))


def test_faq_nan():
    adata = _with_moments()
    adata.layers["Ms"][0, 0] = np.nan
    _in_faq(_error(fv.tl.velocity, adata))


def test_faq_negative_counts():
    adata = _counts()
    adata.layers["spliced"][0, :3] = -1
    _in_faq(_error(fv.pp.recipe_flux, adata))


def test_faq_negative_moments():
    adata = _with_moments()
    adata.layers["Ms"][0, 0] = -1
    message = _error(fv.tl.velocity, adata)
    _in_faq(message.split(": ", 1)[1])


def test_faq_cuda_absent():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here, so the error cannot occur")
    _in_faq(_error(fv.tl.velocity, _with_moments(), device="cuda"))


def _lineage() -> AnnData:
    """Pancreas' cluster names on a small ring of cells, with a kNN graph, an embedding and projected velocities."""
    n = len(PANCREAS_CLUSTERS) * 4
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    adata = AnnData(X=np.zeros((n, 2), np.float32))
    adata.obs["clusters"] = pd.Categorical(np.repeat(PANCREAS_CLUSTERS, 4), categories=PANCREAS_CLUSTERS)
    adata.obsm["X_umap"] = np.column_stack([np.cos(angle), np.sin(angle)])
    adata.obsm["velocity_umap"] = np.column_stack([-np.sin(angle), np.cos(angle)])
    rows = np.repeat(np.arange(n), 2)
    cols = np.column_stack([(np.arange(n) - 1) % n, (np.arange(n) + 1) % n]).ravel()
    adata.obsp["distances"] = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    return adata


def test_faq_unknown_cluster():
    adata = _lineage()
    edges = [("Pre-endocrine", "Betta")]
    _in_faq(_error(fv.metrics.cross_boundary_correctness, adata, cluster_key="clusters", edges=edges))
    message = _error(fv.metrics.cross_boundary_correctness, adata, cluster_key="cell_type", edges=edges)
    _in_faq(message.split("; it has")[0])  # the listed columns depend on the data
    # the right names score without error
    pooled, _ = fv.metrics.cross_boundary_correctness(adata, cluster_key="clusters", edges=[("Pre-endocrine", "Beta")])
    assert pooled > 0.9


def test_faq_missing_graph():
    adata = _lineage()
    _in_faq(_error(fv.tl.velocity_embedding, adata, basis="umap"))


def test_faq_offline_download(tmp_path, monkeypatch):
    import pooch

    def offline(*args, **kwargs):
        raise ConnectionError("...")

    monkeypatch.setattr(pooch, "retrieve", offline)
    monkeypatch.delenv("FLUXVELO_DATA_DIR", raising=False)
    monkeypatch.setattr(fv.settings, "_data_dir", None)
    monkeypatch.setattr(fv.settings, "_cache_dir", tmp_path)
    for name in ("pancreas", "hindbrain"):
        message = _error(fv.datasets.load, name).replace(str(tmp_path), "~/.cache/fluxvelo")
        _in_faq(message)
    assert not list(tmp_path.iterdir()), "a failed download left files behind"


def test_faq_non_finite_loss():
    rng = np.random.default_rng(0)
    adata = AnnData(X=np.zeros((40, 6), np.float32))
    adata.layers["Ms"] = (rng.random((40, 6)) * 1e30).astype(np.float32)
    adata.layers["Mu"] = (rng.random((40, 6)) * 1e30).astype(np.float32)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        _in_faq(_error(fv.tl.velocity, adata, gene_scale=False, epochs=1))
