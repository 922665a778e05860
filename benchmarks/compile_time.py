"""First-use compile time of the fused CPU kernels: each kernel's first call on tiny inputs, with an empty cache.

This is what a fresh install pays once (per user cache, see ``fluxvelo._jit``) before its first CPU fit runs the
fused loops. Run it as its own process; it points numba at a new temporary cache folder.

``--children`` times what a fit does instead: the compile shared out between child processes, one per free core
(``fluxvelo._jit.start_compile``), rather than one kernel after another in this process.

``--variant`` compiles a rewritten copy of the kernel module instead, to weigh a cheaper compile against slower
loops: ``no-inline`` drops ``inline="always"`` from the helpers (numba then compiles each helper once instead of
inlining its IR into every kernel; ad hoc, the kernels compiled no faster and ran 1.4 times slower in a fit).
``--fit`` then times two default
pancreas fits in the same process with those kernels (the first one warm, as the kernels are compiled by then).

Usage::

    python benchmarks/compile_time.py [--variant no-inline | --children] [--fit]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from fluxvelo import _jit

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fluxvelo-compile-")

REWRITES = {"no-inline": (', inline="always"', "")}
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--variant", choices=["as-is", *REWRITES], default="as-is")
parser.add_argument("--children", action="store_true", help="compile in child processes, as a fit does")
parser.add_argument("--fit", action="store_true", help="then time two default pancreas fits with these kernels")
args = parser.parse_args()
if args.children and args.variant != "as-is":
    parser.error("--children compiles the kernels as they are")

start = time.perf_counter()
if args.variant == "as-is":
    from fluxvelo.flux import _kernel_cpu as kernels  # noqa: E402
else:  # a rewritten copy, registered under the module's own name so that the fit uses it
    spec = importlib.util.find_spec("fluxvelo.flux._kernel_cpu")
    copy = Path(os.environ["NUMBA_CACHE_DIR"]) / "_kernel_cpu_variant.py"
    copy.write_text(Path(spec.origin).read_text(encoding="utf-8").replace(*REWRITES[args.variant]), encoding="utf-8")
    variant = importlib.util.spec_from_file_location("fluxvelo.flux._kernel_cpu", copy)
    kernels = importlib.util.module_from_spec(variant)
    sys.modules["fluxvelo.flux._kernel_cpu"] = kernels
    variant.loader.exec_module(kernels)

print(f"import of the kernel module {time.perf_counter() - start:6.2f} s")
if args.children:
    from fluxvelo.flux._kernel import _cpu_kernels

    t = time.perf_counter()
    _cpu_kernels()
    print(f"compile in child processes  {time.perf_counter() - t:6.2f} s")
for name in reversed(_jit.FIT_KERNELS[2]):  # the first call pays numba's own start-up too
    t = time.perf_counter()
    kernels.warm_up((name,))  # tiny inputs of the types that the fit passes
    print(f"first call of {name:12s} {time.perf_counter() - t:6.2f} s")
print(f"total                       {time.perf_counter() - start:6.2f} s  (load {os.getloadavg()[0]:.2f}, "
      f"variant {args.variant}{', compiled in child processes' if args.children else ''})")
if args.fit:
    import logging

    import fluxvelo as fv
    from fluxvelo.benchmark._datasets import prepare

    logging.getLogger("fluxvelo").setLevel(logging.WARNING)
    prep = prepare("pancreas_2000", download=False)
    for seed in range(2):
        adata = prep.adata.copy()
        t = time.perf_counter()
        fv.tl.velocity(adata, random_state=seed)
        print(f"default pancreas fit {seed + 1}      {time.perf_counter() - t:6.2f} s", flush=True)
