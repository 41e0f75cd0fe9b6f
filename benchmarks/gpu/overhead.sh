#!/usr/bin/env bash
# `python benchmarks/overhead.py` on one GPU (H100 / H200), lengths 1024 2048 4096; about 4-6 minutes of device time.
#
# Two steps, both from the repository root:
#
#   1. here, once:          bash benchmarks/gpu/overhead.sh prepare
#      - .whl/overhead/          the project's Python dependencies the GPU image lacks or has at another version
#                                (transformers, trl, peft, datasets, dill, multiprocess), as wheels for Python 3.12
#      - .cache/bench-smollm2/   SmolLM2-135M-Instruct's config and tokenizer, no weights (4 MB)
#      Both folders are git-ignored and travel only when named in `carry`.
#
#   2. on the device:       run(command="bash benchmarks/gpu/overhead.sh", carry=[".whl/overhead", ".cache/bench-smollm2"],
#                               timeout_s=540)
#      Results come back from $OUT: overhead-cuda.json, overhead-cuda.md (the table for BENCHMARKS.md), log.txt.
#
# The model's weights do not travel: the embedded GGUF file is 98 MB and a device call takes at most 64 MiB of
# files. The workers build SmolLM2-135M's exact architecture with random weights instead (--random-init); step
# time and memory depend on the shapes, not on the values. Nothing is installed beyond the project's own
# dependencies, into /tmp/site, and the project runs from src/ (the same code `pip install -e .` would install).
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL_DIR=.cache/bench-smollm2
WHEEL_DIR=.whl/overhead  # a folder of its own: other tools keep other versions in .whl/
WHEELS=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

if [ "${1:-run}" = prepare ]; then
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEEL_DIR" "${WHEELS[@]}"
    PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" python - "$MODEL_DIR" <<'EOF'
import shutil, sys
from pathlib import Path
from common import hf_checkpoint  # benchmarks/common.py

source = Path(hf_checkpoint(None, Path("/tmp"), quick=False))  # the embedded model as a plain checkpoint
target = Path(sys.argv[1])
target.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():
    if path.suffix != ".safetensors" and path.name != "DONE":  # everything but the weights
        shutil.copy2(path, target / path.name)
print("model config and tokenizer in", target, sorted(p.name for p in target.iterdir()))
EOF
    du -sh "$WHEEL_DIR" "$MODEL_DIR"
    exit 0
fi

OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$OUT/log.txt"
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)" | tee -a "$OUT/log.txt"
set -o pipefail
# BENCH_DEVICE / BENCH_SEQ_LENS / BENCH_REPEATS / BENCH_WARMUP only exist to dry-run this script on a CPU.
# shellcheck disable=SC2086
python3 benchmarks/overhead.py --device "${BENCH_DEVICE:-cuda}" --seq-lens ${BENCH_SEQ_LENS:-1024 2048 4096} \
    --model "$MODEL_DIR" --random-init --repeats "${BENCH_REPEATS:-10}" --warmup "${BENCH_WARMUP:-3}" \
    --out "$OUT/overhead-cuda.json" --markdown "$OUT/overhead-cuda.md" 2>&1 \
    | grep -v -E "it/s\]|examples/s\]|Warning|warnings.warn" | tee -a "$OUT/log.txt"
