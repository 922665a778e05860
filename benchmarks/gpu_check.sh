#!/usr/bin/env bash
# GPU checks in one go, for a machine with CUDA: the gpu-marked tests, then benchmarks/gpu_check.py (pancreas fits
# on the GPU, default and full reference, with their metrics). Needs fluxvelo importable (installed, or this
# repository on PYTHONPATH) with a CUDA build of torch, and the pancreas file in $FLUXVELO_DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -m gpu -q -p no:cacheprovider tests/test_velocity.py
python benchmarks/gpu_check.py "$@"
