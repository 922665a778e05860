"""Speed as users meet it: a busy machine, a fresh install on a read-only path, the command line's start-up.

Prints, in one run on one machine:
- the default pancreas fit, idle against one busy single-threaded CPU-bound process that this script starts,
  in alternating pairs (target: contended <= 1.5x idle);
- first use in a fresh process on a read-only copy of the package with an empty HOME (so an empty numba cache):
  the fit against the same process's second fit (target <= 2x), and velocity graph + embedding, cold and warm,
  against scVelo's, cold, on the same velocities (target: fluxvelo's cold beats scVelo's cold); then the next
  process in that same setting (the compiled kernels come from the per-user cache);
- first use as above on a copy that ``fluxvelo compile`` compiled before it was made read-only, as whoever builds a
  shared environment or a container image would (target <= 2x);
- the usual first session in that same setting: a fresh process loads raw pancreas, runs ``fv.pp.recipe_flux`` and
  then the fit twice. The fit's kernels compile while the preprocessing runs (``fluxvelo._jit``), so the first fit
  is compared with the second;
- ``fluxvelo --help`` (target < 1 s) and ``import fluxvelo`` (target < 1.5 s), as whole processes.

The machine's other load is printed with each part; the ratios compare runs taken in this script, side by side.

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/user_speed.py [--pairs 2] \
        [--parts startup,contended,cold,installed,pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fluxvelo as fv

_FIT = """
import json, sys, time
import anndata as ad
import fluxvelo as fv
fv.settings.progress_bar = False
fv.settings.verbosity = "warning"
adata = ad.read_h5ad(sys.argv[1])
out = {"fluxvelo_file": fv.__file__}
for name in ("fit_cold", "fit_warm"):
    start = time.perf_counter(); fv.tl.velocity(adata); out[name] = time.perf_counter() - start
for name in ("graph_embedding_cold", "graph_embedding_warm"):
    start = time.perf_counter()
    fv.tl.velocity_graph(adata); fv.tl.velocity_embedding(adata, basis="umap")
    out[name] = time.perf_counter() - start
start = time.perf_counter()
fv.tl.velocity_graph(adata, backend="numpy"); fv.tl.velocity_embedding(adata, basis="umap", backend="scipy")
out["graph_embedding_numpy"] = time.perf_counter() - start
print(json.dumps(out))
"""

_PIPELINE = """
import json, time
import fluxvelo as fv
fv.settings.progress_bar = False
fv.settings.verbosity = "warning"
adata = fv.datasets.load("pancreas_2000", download=False)
out = {}
start = time.perf_counter(); fv.pp.recipe_flux(adata); out["recipe"] = time.perf_counter() - start
for name in ("fit_cold", "fit_warm"):
    start = time.perf_counter(); fv.tl.velocity(adata); out[name] = time.perf_counter() - start
print(json.dumps(out))
"""

_SPAWNS = "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)"

_SCVELO = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import anndata as ad
import scvelo as scv
scv.settings.verbosity = 0
adata = ad.read_h5ad(sys.argv[1])
start = time.perf_counter()
scv.tl.velocity_graph(adata); scv.tl.velocity_embedding(adata, basis="umap")
print(json.dumps({"graph_embedding_cold": time.perf_counter() - start}))
"""

_BUSY = "while True:\n    pass\n"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def prepared(workdir: Path) -> Path:
    """Pancreas after the paper's preprocessing (with a UMAP), written once; also warms this process's caches."""
    adata = fv.datasets.load("pancreas_2000")
    fv.pp.recipe_flux(adata)
    path = workdir / "pancreas_prepared.h5ad"
    adata.write_h5ad(path)
    return path


def _fit_seconds(adata) -> float:
    start = time.perf_counter()
    fv.tl.velocity(adata)
    return time.perf_counter() - start


def contended(path: Path, pairs: int) -> dict:
    """Alternating idle / busy-neighbour fits in this (warm) process; medians of each."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    _fit_seconds(adata)  # warm-up: kernels loaded, caches filled
    idle, busy = [], []
    for _ in range(pairs):
        idle.append(_fit_seconds(adata))
        with busy_neighbour():
            busy.append(_fit_seconds(adata))
    return {"idle": idle, "busy": busy}


@contextmanager
def busy_neighbour() -> Iterator[None]:
    """One busy single-threaded CPU-bound process beside this one while the block runs."""
    neighbour = subprocess.Popen([sys.executable, "-c", _BUSY])
    try:
        time.sleep(1.0)  # let the scheduler and the load probe see it
        yield
    finally:
        neighbour.kill()
        neighbour.wait()


def _read_only_copy(root: Path, *, compiled: bool = False) -> Path:
    """A copy of the fluxvelo package without numba caches, made read-only; returns the folder to put on sys.path.

    ``compiled``: run ``fluxvelo compile`` on the copy first, as whoever installs a shared environment would.
    """
    site = root / "site"
    package = Path(fv.__file__).parent
    shutil.copytree(package, site / "fluxvelo", ignore=shutil.ignore_patterns("*.nbi", "*.nbc"))
    registry = site / "fluxvelo" / "datasets" / "datasets.toml"
    if not registry.exists():  # a source checkout keeps it in data/
        shutil.copy(package.parent / "data" / "datasets.toml", registry)
    if compiled:
        env = {k: v for k, v in os.environ.items() if k not in {"NUMBA_CACHE_DIR", "PYTHONPATH"}}
        subprocess.run([sys.executable, "-m", "fluxvelo", "compile"], env={**env, "PYTHONPATH": str(site)},
                       cwd=root, check=True, capture_output=True)  # fmt: skip
    for folder, _, files in os.walk(site):
        for name in files:
            os.chmod(Path(folder) / name, 0o444)
        os.chmod(folder, 0o555)
    return site


def _fresh_env(root: Path, site: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH"}}
    home = root / "home"
    home.mkdir(exist_ok=True)
    if _as_user():
        os.chown(home, 65534, 65534)
    env["HOME"] = str(home)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def _as_user() -> list[str]:
    """As root, file modes do not stop writes: run the fresh processes as 'nobody' so that read-only holds."""
    setpriv = shutil.which("setpriv")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and setpriv:
        return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    return []


def _child(code: str, path: Path, env: dict) -> dict:
    out = subprocess.run(  # run in the fresh HOME: Python puts the working directory first on sys.path
        [*_as_user(), sys.executable, "-c", code, str(path)], env=env, cwd=env["HOME"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fresh_site(workdir: Path, *, compiled: bool = False) -> tuple[Path, Path, dict]:
    """A read-only copy of the package and an empty HOME under a new folder: (folder, copy, environment)."""
    root = Path(tempfile.mkdtemp(dir=workdir))
    root.chmod(0o755)
    site = _read_only_copy(root, compiled=compiled)
    env = _fresh_env(root, site)
    # The fit compiles its kernels in child processes of the interpreter. As 'nobody', an interpreter under a
    # private folder (a pyenv in /root) starts but cannot start itself again: the children fail, and the fit
    # compiles in-process, which is not what a user who can run their own Python meets.
    spawn = subprocess.run([*_as_user(), sys.executable, "-c", _SPAWNS], env=env, cwd=env["HOME"], capture_output=True)
    if spawn.returncode != 0:
        print(f"  note: the fresh user cannot start {sys.executable} from Python, so the kernels compile in-process "
              "(make the interpreter's folders searchable by all to measure what users meet)")
    return root, site, env


def _open_up(*folders: Path) -> None:
    """Make the fresh processes' folders writable again, so that the temporary folder can be removed."""
    for folder in folders:
        for sub, dirs, _ in os.walk(folder):
            for name in dirs:
                os.chmod(Path(sub) / name, 0o755)


def cold(path: Path, workdir: Path) -> dict:
    """First and next process on a read-only copy with an empty HOME; scVelo cold on fluxvelo's velocities."""
    root, site, env = _fresh_site(workdir)
    first = _child(_FIT, path, env)
    assert first["fluxvelo_file"].startswith(str(site)), first["fluxvelo_file"]
    caches = sorted({str(p.parent) for p in root.rglob("*.nbi")})
    second = _child(_FIT, path, env)
    import anndata as ad

    adata = ad.read_h5ad(path)
    fv.tl.velocity(adata)
    with_velocity = workdir / "pancreas_velocity.h5ad"
    adata.write_h5ad(with_velocity)
    scv_root = Path(tempfile.mkdtemp(dir=workdir))
    scv_root.chmod(0o755)
    scvelo = _child(_SCVELO, with_velocity, _fresh_env(scv_root, None))
    _open_up(root, scv_root)
    return {"first": first, "next": second, "scvelo": scvelo, "numba_cache": caches, "home": str(root / "home")}


def installed(path: Path, workdir: Path) -> dict:
    """First process on a read-only copy whose kernels ``fluxvelo compile`` compiled at install, with an empty HOME."""
    root, site, env = _fresh_site(workdir, compiled=True)
    first = _child(_FIT, path, env)
    assert first["fluxvelo_file"].startswith(str(site)), first["fluxvelo_file"]
    _open_up(root)
    return first


def pipeline(workdir: Path) -> dict:
    """A first session in a fresh process on a read-only copy with an empty HOME: raw pancreas, recipe, two fits."""
    root, _, env = _fresh_site(workdir)
    out = _child(_PIPELINE, workdir, env)
    _open_up(root)
    return out


def _process_seconds(argv: list[str], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def startup() -> dict:
    cli = shutil.which("fluxvelo")
    return {
        "help": _process_seconds([cli, "--help"] if cli else [sys.executable, "-m", "fluxvelo", "--help"]),
        "import": _process_seconds([sys.executable, "-c", "import fluxvelo"]),
        "python": _process_seconds([sys.executable, "-c", "pass"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="idle / busy pairs of fits")
    parser.add_argument("--parts", default="startup,contended,cold,installed,pipeline",
                        help="which parts to run, comma-separated")  # fmt: skip
    parser.add_argument("--prepared", type=Path, default=None,
                        help="pancreas already through recipe_flux (with X_umap), to skip the preprocessing")  # fmt: skip
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    fv.settings.progress_bar = False
    fv.settings.verbosity = "warning"

    import numba
    import torch

    from fluxvelo._threads import usable_cores

    print(f"machine: {platform.machine()}, {usable_cores()} usable cores, torch {torch.__version__}, "
          f"numba {numba.__version__} ({numba.config.THREADING_LAYER} threading layer), fluxvelo {fv.__version__}; "
          f"load average {_load()}")  # fmt: skip
    if "startup" in parts:
        s = startup()
        print(f"\nstart-up, whole process, median of 3 (bare python: {s['python']:.2f} s):")
        print(f"  fluxvelo --help    {s['help']:.2f} s (target < 1 s)")
        print(f"  import fluxvelo    {s['import']:.2f} s (target < 1.5 s)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # readable by the fresh processes, which may run as another user
        if args.prepared is not None:
            path = workdir / "pancreas_prepared.h5ad"
            shutil.copy(args.prepared, path)
            path.chmod(0o644)
        elif parts & {"contended", "cold", "installed"}:
            path = prepared(workdir)
        if "contended" in parts:
            load = _load()
            r = contended(path, args.pairs)
            idle, busy = statistics.median(r["idle"]), statistics.median(r["busy"])
            print(f"\ndefault pancreas fit, warm, {args.pairs} alternating pairs (load average before: {load}):")
            print(f"  idle                         {idle:6.2f} s  runs {', '.join(f'{t:.2f}' for t in r['idle'])}")
            print(f"  one busy process beside it   {busy:6.2f} s  runs {', '.join(f'{t:.2f}' for t in r['busy'])}")
            print(f"  contended / idle = {busy / idle:.2f} (target <= 1.5)")
        if "cold" in parts:
            load = _load()
            r = cold(path, workdir)
            first, nxt, scv = r["first"], r["next"], r["scvelo"]
            print(f"\nfirst use: fresh process, read-only copy of the package, empty HOME (load average before: {load}):")
            print(f"  fit, first in the process    {first['fit_cold']:6.2f} s")
            print(f"  fit, second in the process   {first['fit_warm']:6.2f} s")
            print(f"  first / second = {first['fit_cold'] / first['fit_warm']:.2f} (target <= 2)")
            print(f"  graph + embedding, first     {first['graph_embedding_cold']:6.2f} s "
                  f"(then {first['graph_embedding_warm']:.2f} s; numpy/scipy backends "
                  f"{first['graph_embedding_numpy']:.2f} s)")  # fmt: skip
            print(f"  scVelo graph + embedding, fresh process, same velocities {scv['graph_embedding_cold']:6.2f} s")
            print(f"  fluxvelo / scVelo, cold = {first['graph_embedding_cold'] / scv['graph_embedding_cold']:.2f} "
                  "(target < 1)")  # fmt: skip
            print(f"  the next process, same setting: fit {nxt['fit_cold']:.2f} s, graph + embedding "
                  f"{nxt['graph_embedding_cold']:.2f} s")  # fmt: skip
            caches = [c.replace(r["home"], "$HOME") for c in r["numba_cache"]]
            user = "as user 'nobody'" if _as_user() else "as this user"
            print(f"  (fresh processes ran {user}) numba cache written to: {', '.join(caches) or 'nowhere'}")
        if "installed" in parts:
            load = _load()
            r = installed(path, workdir)
            print("\nfirst use: fresh process, read-only copy compiled at install (`fluxvelo compile`), empty HOME "
                  f"(load average before: {load}):")  # fmt: skip
            print(f"  fit, first in the process    {r['fit_cold']:6.2f} s")
            print(f"  fit, second in the process   {r['fit_warm']:6.2f} s")
            print(f"  first / second = {r['fit_cold'] / r['fit_warm']:.2f} (target <= 2)")
            print(f"  graph + embedding, first     {r['graph_embedding_cold']:6.2f} s")
        if "pipeline" in parts:
            load = _load()
            r = pipeline(workdir)
            print(f"\nfirst session: fresh process, read-only copy, empty HOME, raw pancreas (load average before: {load}):")
            print(f"  fv.pp.recipe_flux            {r['recipe']:6.2f} s")
            print(f"  fit, first in the process    {r['fit_cold']:6.2f} s")
            print(f"  fit, second in the process   {r['fit_warm']:6.2f} s")
            print(f"  first / second = {r['fit_cold'] / r['fit_warm']:.2f}; "
                  f"preprocessing and first fit {r['recipe'] + r['fit_cold']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
