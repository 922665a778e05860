#!/bin/bash
# cellDancer 1.1.7 in its own virtualenv, for `fluxvelo benchmark --peer-python celldancer=VENV/bin/python`.
#
# Its pins (torch 1.10, numpy 1.20, pandas 1.3, pytorch-lightning 1.5) have no wheels for Python 3.11, so it is
# installed without them, on the oldest stack of each package that still has wheels there and that its code runs
# on: pytorch-lightning 1.6 (it passes `progress_bar_refresh_rate`, removed in 1.7), pandas < 2 (it calls
# `DataFrame.append`), and the numpy/anndata/xarray/datashader/dask that go with pandas 1.5. torch >= 2.6 refuses
# to load its shipped initial networks by default; the adapter sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for them.
#
# Usage: bash benchmarks/peer_envs/celldancer.sh /path/to/venv-celldancer
set -euo pipefail
venv=${1:?give the folder of the new virtualenv}
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install torch==2.13.0
"$pip" install --no-deps celldancer==1.1.7
"$pip" install "pytorch-lightning==1.6.5" "pandas<2" "numpy<2" "anndata<0.10" "xarray<2023.9" "datashader<0.16" \
    "dask<2024.1" "setuptools<81" scipy scikit-learn scikit-image statsmodels matplotlib seaborn umap-learn h5py \
    joblib tqdm bezier
"$venv/bin/python" -c "import celldancer, celldancer.utilities; print('cellDancer imports')"
