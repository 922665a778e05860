"""Sphinx configuration of the fluxvelo documentation (build: ``sphinx-build -W -b html docs docs/_build/html``)."""

from __future__ import annotations

import fluxvelo

project = "fluxvelo"
author = "fluxvelo developers"
copyright = "2026, fluxvelo developers"  # noqa: A001
version = release = fluxvelo.__version__

extensions = [
    "myst_nb",  # Markdown pages (MyST) and the tutorial notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
]

# Pages are MyST Markdown; tutorials/ is a link to the repository's tutorials/ folder.
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# Notebooks are stored with their outputs (executed once with nbclient); the build never runs them.
nb_execution_mode = "off"

# API reference (docs/api/*.md): one automodule per subpackage; its members are the names in __all__.
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "furo"
html_title = f"fluxvelo {release}"
