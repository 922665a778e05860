"""Where numba keeps fluxvelo's compiled kernels, one log line when they have to be compiled, and who compiles them.

numba caches each compiled kernel (``cache=True``) in the first writable place of:

1. ``$NUMBA_CACHE_DIR``, when set;
2. ``__pycache__`` next to the module's source (a writable install, e.g. ``pip install -e``);
3. the per-user cache, ``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba`` on Linux (``~/Library/Caches/numba``
   on macOS, ``%LOCALAPPDATA%\\numba\\numba\\Cache`` on Windows), under a sub-folder named after the package's
   path. This is what a read-only install (a shared conda environment, a container image) uses.

Where none of these is writable (a read-only HOME as well), :func:`ensure_cache_dir` points numba at
``fluxvelo.settings.cache_dir / 'numba'`` (itself the temporary folder when HOME is read-only), so that at least
the processes of one machine share one compile. ``fluxvelo compile`` (:func:`compile_all`), run once after
installing, compiles every kernel into the package's folder; processes that cannot write there copy them into
their own cache (:func:`seed_cache`) instead of compiling.

The fit's fused kernels are compiled, where they are not cached, by child processes, one per free core
(:func:`start_compile`), which the preprocessing and the first access to ``fv.tl`` start ahead of the fit
(:func:`compile_fit_kernels_ahead`); the velocity graph's and the embedding's compile in detached child processes
while numpy's path serves the calls (:func:`compile_in_children`), and those children finish even where the
calling process exits first.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("fluxvelo")

_announced: set[str] = set()
# Seconds after which a child that compiles kernels is given up (its kernels then compile in the caller).
CHILD_TIMEOUT_S = 600


def _writable(folder: Path) -> bool:
    """Whether ``folder`` (or its first existing parent, where it would be created) accepts files."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not os.access(candidate, os.W_OK):
                return False
            try:  # os.access ignores read-only mounts
                with tempfile.TemporaryFile(dir=candidate):
                    pass
            except OSError:
                return False
            return True
    return False


def _user_cache_dir() -> Path:
    from numba.misc.appdirs import AppDirs

    return Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)


def ensure_cache_dir(source: str | os.PathLike) -> None:
    """Give numba a writable cache for the kernels defined in ``source``; call before defining them.

    Where the package's folder is read-only but holds kernels compiled at install time (``fluxvelo compile``),
    they are copied into the cache that numba uses instead (:func:`seed_cache`).
    """
    import numba

    in_tree = Path(source).parent / "__pycache__"
    if _writable(in_tree):
        return
    if not numba.config.CACHE_DIR and not _writable(_user_cache_dir()):
        from ._settings import settings

        folder = settings.cache_dir / "numba"
        if not _writable(folder):
            folder = Path(tempfile.gettempdir()) / f"fluxvelo-numba-{os.getuid() if hasattr(os, 'getuid') else 0}"
        numba.config.CACHE_DIR = str(folder)
        logger.debug("numba cache: %s (neither the package's folder nor the user cache is writable)", folder)
    seed_cache(source, Path(numba.config.CACHE_DIR or _user_cache_dir()))


def seed_cache(source: str | os.PathLike, cache_root: Path) -> int:
    """Copy the compiled kernels of the module ``source`` from its ``__pycache__`` to numba's cache under
    ``cache_root``, where that lacks them or holds older ones; returns the number of files copied.

    numba's cache files name the module and the function and are stamped with a hash of the source, not with its
    path, so a copy loads wherever numba looks for it (``numba.core.caching``); a stale copy is recompiled.
    """
    from numba.core.caching import _CacheLocator

    source = Path(source)
    files = source.parent.joinpath("__pycache__").glob(f"{source.stem}.*.nb[ci]")
    target = cache_root / _CacheLocator.get_suitable_cache_subpath(str(source))
    copied = 0
    for path in sorted(files, key=lambda f: f.suffix == ".nbi"):  # the data before the indexes that name them
        destination = target / path.name
        try:
            if destination.exists() and destination.stat().st_mtime >= path.stat().st_mtime:
                continue
            target.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(f".{path.name}.{os.getpid()}")
            shutil.copy2(path, partial)
            os.replace(partial, destination)  # whole, for a process that reads the cache meanwhile
            copied += 1
        except OSError as err:
            logger.debug("could not copy the compiled kernel %s to %s: %s", path, target, err)
    if copied:
        logger.debug("copied %d compiled kernel files of %s to %s", copied, source.name, target)
    return copied


def cache_folder(dispatcher) -> str | None:
    """The folder that holds ``dispatcher``'s cache, or None when it is not cached."""
    cache = getattr(dispatcher, "_cache", None)
    return getattr(cache, "_cache_path", None)


def _is_cached(dispatcher) -> bool:
    cache = getattr(dispatcher, "_cache", None)
    index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
    return bool(dispatcher.overloads) or (index is not None and os.path.exists(index))


def _uncached(kernels, names) -> tuple[str, ...]:
    """The kernels ``names`` of the module ``kernels`` that are neither loaded nor in numba's cache, in order."""
    return tuple(name for name in names if not _is_cached(getattr(kernels, name)))


def announce_compile(what: str, dispatchers) -> None:
    """Log one line before numba compiles ``what``: when any of its kernels is neither loaded nor cached.

    Each ``what`` is announced at most once per process.
    """
    if what in _announced:
        return
    _announced.add(what)
    missing = [d for d in dispatchers if not _is_cached(d)]
    if not missing:
        return
    where = cache_folder(missing[0])
    logger.info(
        "compiling %s for this machine (once; cached in %s for later processes)",
        what,
        where or "no cache folder",
    )


# The fit's fused CPU kernels: their module, what the log calls them, and their names in the order that deals them
# out evenly (about 0.4, 0.6 and 0.3 s to compile on the 2-core machine of benchmarks/compile_time.py: two children
# get 0.7 and 0.6 s).
FIT_KERNELS = ("fluxvelo.flux._kernel_cpu", "the fused CPU kernels", ("moments_rect", "score_terms_rect", "anchor_sums_rect"))

#: Whether numba is installed (it comes with scanpy and umap-learn); the graph and the embedding have numpy paths.
HAS_NUMBA = importlib.util.find_spec("numba") is not None

# The velocity graph's and the embedding's kernels, which have numpy paths that serve the calls until they are compiled.
PROJECTION_KERNELS = (
    "fluxvelo.tl._projection_kernels", "the velocity graph's and the embedding's kernels", ("project", "hood", "pair_sums")
)  # fmt: skip

# Per kernel module: the children compiling its kernels (empty once they are waited for), and the kernels that the
# last of them compiles one after another where it was started with cores to spare (else empty); None where a start
# ahead found no core to spare, which leaves the compile to the fit.
_compiling: dict[str, tuple[list[subprocess.Popen], tuple[str, ...]] | None] = {}


def import_kernels(module: str):
    """Import the numba module ``module`` with a writable cache (numba fixes a kernel's cache when it is defined)."""
    if module not in sys.modules:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            ensure_cache_dir(spec.origin)
    return importlib.import_module(module)


def projection_kernels():
    """The module of the velocity graph's and the embedding's kernels, imported with a writable cache."""
    return import_kernels(PROJECTION_KERNELS[0])


def start_compile(module: str, what: str, names: tuple[str, ...], *, spare_cores: int = 0) -> None:
    """Import the numba module ``module`` with a writable cache and start compiling ``names`` where they are not cached.

    The compile is announced with one log line and runs in child processes (:func:`start_children`, leaving
    ``spare_cores`` of the free cores to this process); this returns at once, and :func:`load_kernels` waits for
    them. ``module`` must define ``warm_up(names)``, which compiles the kernels it is given by calling them on tiny
    inputs of the types its callers pass; ``names`` are in the order that deals them out evenly. Once per module
    and process.
    """
    if module in _compiling:
        return
    kernels = import_kernels(module)
    missing = _uncached(kernels, names)
    announce_compile(what, [getattr(kernels, name) for name in missing])
    children = start_children(kernels, missing, spare_cores=spare_cores) if missing else []
    if missing and not children and spare_cores:
        _compiling[module] = None  # no core to spare now: the fit starts the compile
        return
    _compiling[module] = (children, missing[len(children) - 1 :: len(children)] if spare_cores and children else ())


def compile_fit_kernels_ahead(device: str | None = None, *, spare_cores: int = 0) -> None:
    """Start compiling the fit's fused CPU kernels, where they are not cached, for a fit on ``device`` (a device type
    or name; None: ``settings.device``) that may follow, so that the compile overlaps the work before it.

    ``spare_cores``: free cores to leave to the caller's own work meanwhile (see :func:`load_kernels` for what
    happens to them once the fit waits).

    Nothing happens for a GPU, or without the fused kernels. Never raises: a failure leaves the compile to the fit.
    """
    from ._settings import settings

    device = settings.device if device is None else device
    if not settings.fused_kernels or str(device).startswith(("cuda", "mps")):
        return
    try:
        start_compile(*FIT_KERNELS, spare_cores=spare_cores)
    except Exception as err:  # noqa: BLE001 - the fit compiles them itself
        logger.debug("could not start compiling %s ahead of the fit: %s", FIT_KERNELS[1], err)


def load_kernels(module: str, what: str, names: tuple[str, ...]):
    """The numba module ``module``, its kernels ``names`` compiled: by children (:func:`start_compile`, waited for
    here) or, for any a child failed to compile, in this process on its first call.

    Where a start ahead found no core to spare, the children start here, on every free core. Children started
    ahead with cores to spare are topped up first: the kernels that the last of them has still to do, less the
    one it is compiling now, go to children on the cores that are free, in reverse order. A child that comes to a
    kernel another has cached loads it instead of compiling it.
    """
    start_compile(module, what, names)
    kernels = sys.modules[module]
    if _compiling[module] is None:
        missing = _uncached(kernels, names)
        _compiling[module] = (start_children(kernels, missing) if missing else [], ())
    children, queue = _compiling[module]
    if children:
        todo = _uncached(kernels, queue)
        if len(todo) > 1 and children[-1].poll() is None:
            children += start_children(kernels, tuple(reversed(todo[1:])))
        wait_for(children)
        children.clear()
    return kernels


def start_children(
    kernels, names: tuple[str, ...], *, spare_cores: int = 0, detached: bool = False
) -> list[subprocess.Popen]:
    """Start compiling the kernels ``names`` of the module ``kernels`` into numba's cache, in child processes.

    numba compiles under the GIL, one kernel after another, so only processes compile at once: as many children
    as there are free cores less ``spare_cores`` (none where that leaves none), dealt ``names`` in turn, so that
    with ``names`` in a suitable order their shares come out even (a child imports only
    numpy, numba and the kernel module). ``detached`` children run in their own session with no pipe to this
    process, so that they finish where it exits first.
    """
    import numba

    from ._threads import LoadProbe

    if not sys.executable or not os.path.isfile(getattr(kernels, "__file__", None) or ""):
        return []
    n_children = min(len(names), LoadProbe.sampled().free_cores() - spare_cores)
    if n_children < 1:
        return []
    env = dict(os.environ)
    if numba.config.CACHE_DIR:
        env["NUMBA_CACHE_DIR"] = str(numba.config.CACHE_DIR)
    children = []
    for share in (names[i::n_children] for i in range(n_children)):
        command = [sys.executable, "-c", _CHILD, kernels.__file__, kernels.__name__, *share]
        try:
            stderr = subprocess.DEVNULL if detached else subprocess.PIPE
            children.append(subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=detached
            ))  # fmt: skip
        except OSError as err:
            logger.debug("could not start a process to compile %s: %s", share, err)
    return children


def compile_all(modules=None) -> dict[str, tuple[int, str | None]]:
    """Compile every numba kernel of fluxvelo (or of ``modules``: ``(module, description, names)`` each, as
    :data:`FIT_KERNELS`) that is not cached yet, in child processes on the free cores.

    For an install that later processes cannot write to (a shared environment, a container image): run once after
    installing, the kernels go where numba caches them (the package's ``__pycache__`` where that is writable), and
    every later process on a machine of the same CPU loads them (:func:`seed_cache`). A kernel that no child
    compiled is compiled here, so that its error shows.

    Returns
    -------
    Per kernel module's description: the number of kernels compiled and the folder of its cache.
    """
    modules = modules or (FIT_KERNELS, PROJECTION_KERNELS)
    missing = {what: len(_uncached(import_kernels(module), names)) for module, what, names in modules}
    for spec in modules:  # every module's children at once, then wait for each
        start_compile(*spec)
    done = {}
    for module, what, names in modules:
        kernels = load_kernels(module, what, names)
        kernels.warm_up(_uncached(kernels, names))
        done[what] = (missing[what], cache_folder(getattr(kernels, names[0])))
    return done


def wait_for(children: list[subprocess.Popen]) -> None:
    """Wait for compiling children (at most :data:`CHILD_TIMEOUT_S` each); a failure is logged at debug level."""
    for child in children:
        try:
            _, err = child.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        if child.returncode:
            logger.debug("a child process failed to compile kernels: %s", err.decode(errors="replace")[-2000:])


# A child of start_children: load the kernel module from its file, under its own name (numba's cache is keyed by
# the file and the function, so the parent finds what the child writes), without importing its package.
_CHILD = """
import importlib.util, sys
path, name, *names = sys.argv[1:]
spec = importlib.util.spec_from_file_location(name, path)
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
module.warm_up(names)
"""


def ready(dispatchers) -> bool:
    """Whether every kernel is loaded in this process or waits in numba's cache (no compile on its next call)."""
    return all(_is_cached(d) for d in dispatchers)


# Per kernel module: the detached children that compile it for a numpy path's later calls (see compile_in_children).
_detached: dict[str, list[subprocess.Popen]] = {}


def compile_in_children(module: str, what: str, names: tuple[str, ...]) -> list[subprocess.Popen]:
    """Start compiling the kernels ``names`` of ``module``, where they are not cached, in detached child processes
    that leave this process a core (on a one-core machine, one child all the same); once per module and process,
    and nothing waits for them.

    For kernels with a numpy path that serves the calls meanwhile (the velocity graph, the embedding): later calls,
    in this process or any that shares numba's cache, find them compiled, even where this process exits first.
    """
    if module in _detached:
        return _detached[module]
    kernels = import_kernels(module)
    missing = _uncached(kernels, names)
    spare = 1 if (os.cpu_count() or 1) > 1 else 0
    children = start_children(kernels, missing, spare_cores=spare, detached=True) if missing else []
    if children:
        logger.info(
            "%s: not compiled yet, so numpy's path this time; numba compiles them in the background (cached in %s)",
            what, cache_folder(getattr(kernels, missing[0])) or "no cache folder",
        )  # fmt: skip
    _detached[module] = children
    return children
