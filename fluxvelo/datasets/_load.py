"""Finding, verifying, downloading and reading registered datasets."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import anndata
import pandas as pd

from .._settings import settings
from .._utils import progress_disabled
from ._registry import DatasetInfo, _lookup

logger = logging.getLogger("fluxvelo")

_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, so big files are hashed once


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _verify(entry: DatasetInfo, path: Path) -> None:
    if not entry.sha256:
        return
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise ValueError(
            f"Checksum mismatch for dataset {entry.name!r} at {path}: expected sha256 {entry.sha256}, "
            f"found {actual}. The file is corrupt or a different version; replace it with the original "
            f"{entry.file} (or pass path= to another copy)."
        )


def _search_dirs() -> list[Path]:
    dirs = [settings.data_dir] if settings.data_dir is not None else []
    return [*dirs, settings.cache_dir]


def _find_local(entry: DatasetInfo) -> Path | None:
    for folder in _search_dirs():
        candidate = Path(folder).expanduser() / entry.file
        if candidate.is_file():
            return candidate
    return None


def _where_to_put(entry: DatasetInfo) -> str:
    return (
        f"Put {entry.file} into a folder and set the environment variable FLUXVELO_DATA_DIR (or "
        f"fluxvelo.settings.data_dir) to that folder, or copy it to {settings.cache_dir}, or pass "
        f"path='/path/to/{entry.file}'."
    )


class _ByteBar:
    """A tqdm bar behind pooch's progress-bar protocol: pooch sets ``total`` from Content-Length, then updates.

    Setting ``total`` resets the bar to that size (a notebook widget keeps its first size otherwise), and the
    bar is always truthy (pooch skips a falsy one; a tqdm bar of unknown size is not).
    """

    def __init__(self, bar):
        self.bar = bar

    def __bool__(self) -> bool:
        return True

    @property
    def total(self):
        return self.bar.total

    @total.setter
    def total(self, value) -> None:
        self.bar.reset(total=value or None)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def reset(self) -> None:
        self.bar.reset()

    def close(self) -> None:
        self.bar.close()


def _download(entry: DatasetInfo, target: Path) -> Path:
    """Download to a temporary file beside ``target`` and move it into place only once its hash checks."""
    from tqdm.auto import tqdm

    try:
        import pooch
    except ImportError as err:  # pragma: no cover - pooch is a dependency
        raise ImportError(f"Downloading {entry.name!r} needs pooch: pip install pooch. {_where_to_put(entry)}") from err

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".fluxvelo-download-", dir=target.parent))
    except OSError as err:
        raise FileNotFoundError(
            f"Cannot write to {target.parent} to download dataset {entry.name!r} ({err}). {_where_to_put(entry)}"
        ) from err
    logger.info("downloading %r from %s to %s", entry.name, entry.url, target)
    try:
        known_hash = f"sha256:{entry.sha256}" if entry.sha256 else None
        bar = tqdm(desc=entry.name, unit="B", unit_scale=True, disable=progress_disabled(), leave=False)
        try:
            with bar:  # pooch reads the response in chunks and updates the bar by bytes
                fetched = Path(pooch.retrieve(entry.url, known_hash=known_hash, fname=target.name, path=tmpdir,
                                              progressbar=_ByteBar(bar)))  # fmt: skip
        except ValueError as err:
            if "hash" not in str(err).lower():
                raise FileNotFoundError(
                    f"Could not download dataset {entry.name!r} from {entry.url} ({err}). {_where_to_put(entry)}"
                ) from err
            raise ValueError(
                f"The download of dataset {entry.name!r} from {entry.url} failed its sha256 check ({err}). "
                f"Nothing was kept. Try again later, or {_where_to_put(entry)}"
            ) from err
        except Exception as err:  # network, HTTP, disk errors
            raise FileNotFoundError(
                f"Could not download dataset {entry.name!r} from {entry.url} ({type(err).__name__}: {err}). "
                f"If this machine is offline, download the file elsewhere. {_where_to_put(entry)}"
            ) from err
        if entry.sha256 and file_sha256(fetched) != entry.sha256:
            raise ValueError(
                f"The download of dataset {entry.name!r} from {entry.url} failed its sha256 check. Nothing was kept."
            )
        os.replace(fetched, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target


def resolve(name: str, *, path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Local path of a dataset's file, downloading it if needed.

    Parameters
    ----------
    name
        Registry name, alias or file name (see :func:`fluxvelo.datasets.available`).
    path
        File, or folder holding the registry's file name. Taken first; when it does not exist and the
        dataset has a url, the file is downloaded there (a path without suffix is taken as a folder).
    download
        Allow a download when the file is not found locally.

    Returns
    -------
    Path of the verified file (sha256 checked when the registry has one).
    """
    entry = _lookup(name)
    if path is not None:
        target = Path(path).expanduser()
        if target.is_dir() or (not target.exists() and target.suffix == ""):  # a folder
            target = target / entry.file
        if target.is_file():
            _verify(entry, target)
            return target
        if not (download and entry.url):
            why = "downloading is switched off (download=False)" if entry.url else "it has no public download"
            raise FileNotFoundError(
                f"Dataset {entry.name!r}: {target} does not exist and {why}. {_where_to_put(entry)}"
            )
        return _download(entry, target)

    found = _find_local(entry)
    if found is not None:
        _verify(entry, found)
        return found
    searched = ", ".join(str(d) for d in _search_dirs())
    if not entry.url:
        raise FileNotFoundError(
            f"Dataset {entry.name!r} ({entry.file}) was not found in {searched} and has no public download. "
            f"{_where_to_put(entry)}"
        )
    if not download:
        raise FileNotFoundError(
            f"Dataset {entry.name!r} ({entry.file}) was not found in {searched} and download=False. "
            f"{_where_to_put(entry)}"
        )
    return _download(entry, Path(settings.cache_dir).expanduser() / entry.file)


def _join_labels(adata: anndata.AnnData, entry: DatasetInfo) -> None:
    source = _lookup(entry.labels_from)
    found = _find_local(source)
    if found is None:
        logger.warning(
            "%r has no labels and %s was not found locally; obs left without labels.", entry.name, source.file
        )
        return
    _verify(source, found)
    backed = anndata.read_h5ad(found, backed="r")
    obs = backed.obs.copy()
    backed.file.close()
    missing = ~adata.obs_names.isin(obs.index)
    if missing.any():
        logger.warning("%d cells of %r have no label in %s.", int(missing.sum()), entry.name, source.file)
    for col in obs.columns:
        if col not in adata.obs and isinstance(obs[col].dtype, pd.CategoricalDtype):
            adata.obs[col] = obs[col].reindex(adata.obs_names)


def load(name: str, *, path: str | os.PathLike | None = None, download: bool = True) -> anndata.AnnData:
    """Load a registered dataset.

    The file is looked for, in order: ``path``; ``fluxvelo.settings.data_dir`` (default
    ``$FLUXVELO_DATA_DIR``); ``fluxvelo.settings.cache_dir``. Otherwise it is downloaded into the cache
    with pooch, into a temporary file that is moved into place only when its sha256 checks, so no partial
    or corrupt file is ever left. Local files are checked against the registry's sha256 when it has one.

    Parameters
    ----------
    name
        Registry name (:func:`fluxvelo.datasets.available`), an alias, or the file name.
    path
        A file, or a folder holding the registry's file name. When it does not exist and the dataset has
        a url, the file is downloaded there.
    download
        Allow a download when the file is not found locally.

    Returns
    -------
    The AnnData as stored, with unique ``var_names`` and ``obs[cluster_key]`` categorical. Fixtures
    without labels get the ``obs`` columns of ``labels_from`` joined by barcode when that file is
    found locally. Use :func:`fluxvelo.datasets.info` for the cluster key, basis and lineage edges.

    Raises
    ------
    FileNotFoundError
        The file is not found and cannot be downloaded; the message says where to put it.
    ValueError
        Unknown name, or a sha256 mismatch.
    """
    entry = _lookup(name)
    file = resolve(entry.name, path=path, download=download)
    if file.suffix == ".loom":
        adata = anndata.read_loom(file)
    else:
        adata = anndata.read_h5ad(file)
    adata.var_names_make_unique()
    if entry.labels_from and entry.cluster_key and entry.cluster_key not in adata.obs:
        _join_labels(adata, entry)
    key = entry.cluster_key
    if key and key in adata.obs and not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        adata.obs[key] = adata.obs[key].astype("category")
    logger.info("loaded %r from %s: %d cells x %d genes", entry.name, file, adata.n_obs, adata.n_vars)
    return adata


_LOADER_DOC = """{title}

    Registry entry ``{name}``: see :func:`fluxvelo.datasets.info` for the cluster key, embedding and
    lineage edges, and :func:`fluxvelo.datasets.load` for where the file is looked for.

    Parameters
    ----------
    path
        A file, or a folder holding ``{file}``.
    download
        Allow a download when the file is not found locally.

    Returns
    -------
    AnnData with raw ``layers['spliced']`` and ``layers['unspliced']``, ``obs['{key}']``.
    """


def _named(name: str, title: str):
    def loader(*, path: str | os.PathLike | None = None, download: bool = True) -> anndata.AnnData:
        return load(name, path=path, download=download)

    try:
        entry = _lookup(name)
        file, key = entry.file, entry.cluster_key
    except (FileNotFoundError, ValueError):  # broken install: let load() report it
        file, key = "the file", "<cluster_key>"
    loader.__name__ = loader.__qualname__ = name
    loader.__doc__ = _LOADER_DOC.format(title=title, name=name, file=file, key=key)
    return loader


pancreas = _named("pancreas", "Pancreatic endocrinogenesis (Bastidas-Ponce et al. 2019), 3,696 cells.")
pancreas_2000 = _named(
    "pancreas_2000", "Pancreas, all 3,696 cells and 2,000 genes (local file pancreas_3696x2000.h5ad)."
)
bonemarrow = _named("bonemarrow", "Human CD34+ bone marrow (Setty et al. 2019), 5,780 cells.")
dentategyrus = _named("dentategyrus", "Dentate gyrus neurogenesis (Hochgerner et al. 2018), 2,930 cells.")
gastrulation_erythroid = _named(
    "gastrulation_erythroid", "Mouse gastrulation, erythroid lineage (Pijuan-Sala et al. 2019), 9,815 cells."
)
hindbrain = _named("hindbrain", "Mouse hindbrain GABA/glial lineages, 13,501 cells (local file only).")
