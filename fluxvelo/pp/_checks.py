"""Input checks shared by ``pp`` and ``tl``: clear errors that name the fix, raised before anything is written."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .._lazy import count

__all__ = ["check_counts", "check_finite", "check_layers", "check_nonempty", "check_nonnegative", "get_matrix"]


def _names(layers: str | Iterable[str]) -> list[str]:
    return [layers] if isinstance(layers, str) else list(layers)


def _quote(names: Iterable[str]) -> str:
    return "/".join(f"'{n}'" for n in names)


def get_matrix(adata: Any, layer: str) -> Any:
    """``adata.X`` for ``layer='X'``, else ``adata.layers[layer]``."""
    return adata.X if layer == "X" else adata.layers[layer]


def check_nonempty(adata: Any, *, what: str = "adata") -> None:
    """Raise a :class:`ValueError` when ``adata`` has no cells or no genes."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"{what} is empty ({adata.n_obs} cells x {adata.n_vars} genes); "
            "check the filtering thresholds or the input file."
        )


def check_layers(adata: Any, layers: str | Iterable[str], *, hint: str) -> None:
    """Raise a :class:`KeyError` naming the missing layers and the fix.

    Parameters
    ----------
    adata
        Annotated data matrix.
    layers
        Layer names that must be present. ``'X'`` means ``adata.X`` (it must not be None).
    hint
        How to fix it, e.g. ``"run fluxvelo.pp.moments(adata) first"``.
    """
    missing = [
        n for n in _names(layers) if (adata.X is None if n == "X" else n not in adata.layers)
    ]
    if missing:
        noun = "layer" if len(missing) == 1 else "layers"
        raise KeyError(f"{noun} {_quote(missing)} missing: {hint}")


def nonfinite_message(name: str, bad: int) -> str:
    """The error for ``bad`` NaN or infinite values in layer ``name`` (or ``'X'``)."""
    where = "adata.X" if name == "X" else f"adata.layers['{name}']"
    return (
        f"{where} holds {bad} NaN or infinite value(s); remove or impute them "
        "(e.g. np.nan_to_num) before calling this function."
    )


def check_finite(adata: Any, layers: str | Iterable[str]) -> None:
    """Raise a :class:`ValueError` when a layer holds NaN or infinite values (a lazy layer is read once)."""
    for name in _names(layers):
        x = get_matrix(adata, name)
        if x.dtype.kind == "f":
            bad = count(x, lambda v: ~np.isfinite(v))
            if bad:
                raise ValueError(nonfinite_message(name, bad))


def check_nonnegative(adata: Any, layers: str | Iterable[str]) -> None:
    """Raise a :class:`ValueError` when a count layer holds negative values (a lazy layer is read once)."""
    for name in _names(layers):
        x = get_matrix(adata, name)
        if x.dtype.kind in "fi":
            bad = count(x, lambda v: v < 0)
            if bad:
                where = "adata.X" if name == "X" else f"adata.layers['{name}']"
                raise ValueError(
                    f"{where} holds {bad} negative value(s), but raw counts are expected; "
                    "pass the unscaled, non-negative counts (e.g. from velocyto or kallisto|bustools)."
                )


def check_counts(adata: Any, layers: str | Iterable[str] = ("spliced", "unspliced"), *, hint: str | None = None) -> None:
    """Check that ``adata`` is non-empty and that ``layers`` exist, are finite and non-negative."""
    names = _names(layers)
    check_nonempty(adata)
    check_layers(
        adata,
        names,
        hint=hint or "load data with spliced/unspliced counts (e.g. from velocyto or kallisto|bustools)",
    )
    check_finite(adata, names)
    check_nonnegative(adata, names)
