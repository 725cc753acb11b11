#!/usr/bin/env bash
# Set everything up, then run the main job: SmolLM2 answers a few prompts (two through LoRA adapters),
# then serves 32 adapters to 4 tenants under FCFS and VTC and reports each (jaxserve/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/jaxserve demo "$@"
