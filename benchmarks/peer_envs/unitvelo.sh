#!/bin/bash
# UniTVelo 0.2.5.2 in its own virtualenv (TensorFlow), for `fluxvelo benchmark --peer-python unitvelo=VENV/bin/python`.
#
# UniTVelo pulls plain scvelo 0.3.4, which fails under NumPy 2.4; scvelo-modern is laid over it.
#
# Usage: bash benchmarks/peer_envs/unitvelo.sh /path/to/venv-unitvelo
set -euo pipefail
venv=${1:?give the folder of the new virtualenv}
python3 -m venv "$venv"
"$venv/bin/pip" install unitvelo tensorflow-cpu tf_keras
"$venv/bin/pip" install --force-reinstall --no-deps scvelo-modern
"$venv/bin/python" -c "import unitvelo; print('UniTVelo imports')"
