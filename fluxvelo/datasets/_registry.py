"""The dataset registry (``datasets.toml``): parsing, lookup by name or alias, listing."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_FILE_NAME = "datasets.toml"


@dataclass(frozen=True)
class DatasetInfo:
    """One registry entry. Fields can be read as attributes or as ``info['edges']``.

    Attributes
    ----------
    name
        Registry name, e.g. ``'pancreas'``.
    file
        File name searched for locally and used for the download.
    url
        Canonical download location; ``''`` when there is no public one.
    sha256
        Checksum of ``file``; ``''`` when unknown (then not checked).
    cluster_key
        ``obs`` column with the cell types; ``''`` when the file has none.
    basis
        Embedding for plots and CBC, read from ``obsm['X_<basis>']``.
    embedding_in_file
        Whether the file ships that embedding (if not, compute it after preprocessing).
    n_obs
        Number of cells.
    edges
        Annotated lineage edges ``(A, B)`` meaning A -> B.
    tags
        ``'paper'``, ``'benchmark'`` or ``'fixture'``.
    aliases
        Other names accepted by :func:`fluxvelo.datasets.load`.
    labels_from
        Dataset whose ``obs`` is joined by barcode when this file has no labels.
    description, source, note
        Free text.
    """

    name: str
    file: str
    url: str = ""
    sha256: str = ""
    cluster_key: str = ""
    basis: str = ""
    embedding_in_file: bool = False
    n_obs: int = 0
    edges: list[tuple[str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    labels_from: str = ""
    description: str = ""
    source: str = ""
    note: str = ""

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The entry as a plain dict."""
        return asdict(self)


def registry_path() -> Path:
    """Location of ``datasets.toml``: inside the installed package, else the repository's ``data/`` folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / _FILE_NAME, here.parents[1] / "data" / _FILE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The dataset registry {_FILE_NAME} was found neither in {here} (installed package) nor in "
        f"{here.parents[1] / 'data'} (source checkout). Reinstall fluxvelo."
    )


def _parse_entry(name: str, raw: dict[str, Any]) -> DatasetInfo:
    if "file" not in raw:
        raise ValueError(f"Registry entry {name!r} has no 'file'.")
    known = set(DatasetInfo.__dataclass_fields__) - {"name"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"Registry entry {name!r} has unknown fields {sorted(unknown)}.")
    edges = []
    for edge in raw.get("edges", []):
        if len(edge) != 2:
            raise ValueError(f"Registry entry {name!r}: edge {edge!r} is not a pair [A, B].")
        edges.append((str(edge[0]), str(edge[1])))
    values = {**raw, "edges": edges, "sha256": str(raw.get("sha256", "")).lower()}
    for key in ("tags", "aliases"):
        values[key] = [str(v) for v in raw.get(key, [])]
    return DatasetInfo(name=name, **values)


@functools.cache
def _registry() -> dict[str, DatasetInfo]:
    with open(registry_path(), "rb") as fh:
        raw = tomllib.load(fh)
    return {name: _parse_entry(name, entry) for name, entry in raw.items()}


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").removesuffix(".h5ad")


def _lookup(name: str) -> DatasetInfo:
    reg = _registry()
    key = _normalise(name)
    for entry in reg.values():
        if key == entry.name or key in {_normalise(a) for a in entry.aliases} or key == _normalise(entry.file):
            return entry
    raise ValueError(
        f"Unknown dataset {name!r}. Available: {', '.join(reg)}; "
        "for synthetic data with ground truth use fluxvelo.datasets.simulation()."
    )


def info(name: str) -> DatasetInfo:
    """The registry entry of a dataset.

    Parameters
    ----------
    name
        Registry name (see :func:`available`), an alias, or the file name.

    Returns
    -------
    :class:`DatasetInfo` with ``file``, ``url``, ``sha256``, ``cluster_key``, ``basis``,
    ``embedding_in_file``, ``n_obs``, ``edges`` (list of ``(A, B)`` tuples), ``tags``, ``aliases``,
    ``labels_from``, ``description``, ``source`` and ``note``. Fields read as attributes or by key.
    """
    return _lookup(name)


def available(*, tag: str | None = None, local: bool = False) -> list[str]:
    """Names of the registered datasets.

    Parameters
    ----------
    tag
        Keep only entries with this tag: ``'paper'`` (the paper's five), ``'benchmark'`` or ``'fixture'``.
    local
        Keep only datasets whose file is found without downloading (``settings.data_dir`` or
        ``settings.cache_dir``). Checksums are not verified here.

    Returns
    -------
    List of registry names, in registry order.
    """
    from ._load import _find_local

    names = [e.name for e in _registry().values() if tag is None or tag in e.tags]
    if local:
        names = [n for n in names if _find_local(_registry()[n]) is not None]
    return names
