"""Small AnnData helpers for writing results last."""

from __future__ import annotations

from anndata import AnnData


def replace_inplace(adata: AnnData, new: AnnData) -> None:
    """Make ``adata`` hold the contents of ``new`` (new shape included), as anndata's in-place subsetting does."""
    adata._init_as_actual(new)


def view_to_actual(adata: AnnData) -> None:
    """Turn a view into an actual AnnData in place, quietly (before writing results into it)."""
    if adata.is_view:
        adata._init_as_actual(adata.copy())
