"""Where a default pancreas fit spends its time, and what the fused kernels cost to compile on first use.

Prints the compile time of the fused CPU kernels in a fresh process with an empty numba cache, then the
functions that take the most time in one default fit on pancreas (after a warm-up fit), as shares of it.

Usage::

    FLUXVELO_DATA_DIR=../shared/data python benchmarks/profile_fit.py [--top 8]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile

import fluxvelo as fv

_COMPILE = """
import time, torch
from fluxvelo.flux import kernel_mean_offset, pull_back, score_gradient_terms
x = torch.rand(4, 64, 2)
start = time.perf_counter()
kernel_mean_offset(x, x, 1.0); score_gradient_terms(x, x, 1.0, x); pull_back(x, x, 1.0, x)
print(f"{time.perf_counter() - start:.1f}")
"""


def compile_seconds() -> float:
    """First use of the three fused kernels in a new process whose numba cache is empty."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    fv.settings.progress_bar = False
    fv.settings.verbosity = "warning"

    print(f"fused kernels, first use with an empty cache: {compile_seconds():.1f} s")
    adata = fv.datasets.load("pancreas_2000")
    fv.pp.recipe_flux(adata, embedding=None)
    fv.tl.velocity(adata.copy())  # warm-up: loads the cached kernels
    work = adata.copy()
    profile = cProfile.Profile()
    profile.runcall(fv.tl.velocity, work)
    stats = pstats.Stats(profile)
    total = stats.total_tt
    print(f"\ndefault fit on pancreas under cProfile: {total:.2f} s; largest own times:")
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[: args.top]
    for (path, line, name), (_, calls, own, _, _) in rows:
        where = f"{os.path.basename(path)}:{line}({name})" if line else name
        print(f"  {own:6.2f} s  {100 * own / total:5.1f}%  {calls:6d} calls  {where}")


if __name__ == "__main__":
    main()
