#!/usr/bin/env bash
# Set everything up, then run the main job: SmolLM2 answers a few prompts (two through demo LoRA
# adapters) in one batch and reports tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/jaxserve demo "$@"
