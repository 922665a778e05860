"""Shared helpers: device parsing, random state, writing results into AnnData, progress bars."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("fluxvelo")



def progress_disabled() -> bool:
    """Whether progress bars stay off: by ``settings.progress_bar``, or because stderr is not a terminal.

    A bar written to a log file or a pipe redraws itself over the log lines; Jupyter's stream counts as a
    terminal (tqdm.auto draws a widget there).
    """
    from ._settings import settings

    if not settings.progress_bar:
        return True
    stream = sys.stderr
    if stream is None:
        return True
    if type(stream).__module__.startswith("ipykernel"):
        return False
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


_ATTR_NAMES = {"obs", "var", "uns", "obsm", "varm", "layers", "obsp"}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``device`` into a :class:`torch.device`.

    ``'auto'`` (or None) picks CUDA when available, else the CPU. Asking for CUDA on a machine
    without it raises a :class:`RuntimeError` that says how to fix it.
    """
    from ._settings import settings

    if device is None or (isinstance(device, str) and device == "auto"):
        device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={str(device)!r} was asked for, but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False). Use device='cpu' or device='auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={str(device)!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    elif dev.type not in {"cpu", "mps"}:
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu' or 'cuda'.")
    return dev


def make_generators(random_state: int | None, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
    """A NumPy generator and a torch generator on ``device``, both seeded from ``random_state``.

    Global seeds are never touched.
    """
    rng = np.random.default_rng(random_state)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng.integers(0, 2**63 - 1)))
    return rng, gen


def save_data(adata: Any, attr: str, key: str, value: Any) -> None:
    """Write ``value`` into ``adata.<attr>[key]`` and log it, e.g. ``added 'velocity' (adata.layers)``."""
    if attr not in _ATTR_NAMES:
        raise ValueError(f"Unknown AnnData attribute {attr!r}.")
    getattr(adata, attr)[key] = value
    logger.info("    added '%s' (adata.%s)", key, attr)


def save_many(adata: Any, items: Iterable[tuple[str, str, Any]]) -> None:
    """Write several results at once. Call only after everything has been computed."""
    for attr, key, value in items:
        save_data(adata, attr, key, value)


def to_dense(x: Any) -> np.ndarray:
    """A dense float NumPy array from a dense or sparse matrix."""
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x)
