#!/usr/bin/env bash
# GPU checks in one go, for a machine with CUDA: the gpu-marked tests, then the pancreas fit on the GPU next to
# the CPU. Needs the project installed with a CUDA build of torch, and the pancreas file in $FLUXVELO_DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -m gpu -q -p no:cacheprovider
python - <<'PY'
import time

import torch

import fluxvelo as fv

fv.settings.progress_bar = False
fv.settings.verbosity = "warning"
adata = fv.datasets.load("pancreas_2000")
fv.pp.recipe_flux(adata, embedding=None)
for device in ("cuda", "cpu"):
    for preset in ("default", "paper"):
        a = adata.copy()
        kwargs = {"epochs": 2} if preset == "paper" else {}
        fv.tl.velocity(a, preset=preset, device=device, **kwargs)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fv.tl.velocity(a, preset=preset, device=device, random_state=1, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        steps = a.uns["velocity_params"]["steps_taken"]
        print(f"{device:5s} preset={preset:8s} {steps:4d} steps {seconds:8.2f} s ({seconds / steps * 1e3:.1f} ms/step)")
PY
