#!/usr/bin/env bash
# Set up and run the demo: embedded SmolLM2-135M-Instruct + LoRA, ssToken selection, shipped demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sstoken train "$@"
