"""First-use compile time of the fused CPU kernels: each kernel's first call on tiny inputs, with an empty cache.

This is what a fresh install pays once (per user cache, see ``fluxvelo._jit``) before its first CPU fit runs the
fused loops. Run it as its own process; it points numba at a new temporary cache folder.

Usage::

    python benchmarks/compile_time.py
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fluxvelo-compile-")

import numpy as np  # noqa: E402

start = time.perf_counter()
from fluxvelo.flux import _kernel_cpu as kernels  # noqa: E402

print(f"import of the kernel module {time.perf_counter() - start:6.2f} s")
rng = np.random.default_rng(0)
g, d, n, b = 3, 2, 50, 40
z, f = (rng.normal(size=(g, d, n)).astype(np.float32) for _ in range(2))
x = rng.normal(size=(g, d, b)).astype(np.float32)
out, out2 = np.empty_like(z), np.empty_like(z)
no_turnover = np.zeros((1, 0), np.float32)
calls = {
    "mean_offset": lambda: kernels.mean_offset(z, x, np.float32(0.5), out, 2),
    "score_terms": lambda: kernels.score_terms(z, x, f, no_turnover, np.float32(1.0), out, out2, 2),
    "pull_back": lambda: kernels.pull_back(x, z, np.float32(0.5), f, np.empty((g, d, b), np.float32), 2),
}
for name, call in calls.items():  # the first call pays numba's own start-up too
    t = time.perf_counter()
    call()
    print(f"first call of {name:12s} {time.perf_counter() - t:6.2f} s")
print(f"total                       {time.perf_counter() - start:6.2f} s  (load {os.getloadavg()[0]:.2f})")
