#!/usr/bin/env bash
# The GPU run in one command, on a bare machine with Python 3.12 and jax + CUDA preinstalled
# (never reinstall jax there). Pure-Python wheels jaxserve needs that the machine lacks (gguf)
# travel in .whl/ (see benchmarks/README.md) and go into a private folder, not the system's.
#   bash benchmarks/gpu.sh [--out DIR] [--budget SECONDS] ...   (arguments: benchmarks/gpu.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/jaxserve-site .whl/*.whl
    export PYTHONPATH=/tmp/jaxserve-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec "$PYTHON" benchmarks/gpu.py "$@"
