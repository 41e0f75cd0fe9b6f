#!/usr/bin/env bash
# The GPU check: sstoken's GPU paths on one GPU (H100 / H200) in about 5 minutes (benchmarks/gpu/check.py says
# what it measures): head numerics in bf16 on real model shapes, step time and peak memory against stock TRL
# (and TRL with Liger) at T=4096, B=4, and a QLoRA step. Also the way to run benchmarks/overhead.py on a GPU
# machine: its wheels and model folder are the same.
#
# From the repository root:
#
#   1. here, once:        bash benchmarks/gpu/check.sh prepare
#      - .whl/gpu-check/       wheels for Python 3.12 of what the GPU image lacks or has at another version (the
#                              CPU venv's versions); bitsandbytes keeps only its CUDA 13 and CPU libraries, which
#                              takes its wheel from 43 MB to about 3 MB
#      - .cache/bench-smollm2/ SmolLM2-135M-Instruct's config and tokenizer, no weights (4 MB): the step rows are
#                              the demo data in that tokenizer
#      Both folders are git-ignored and travel only when named in `carry`; together with the repository they
#      stay under the 64 MiB a device call takes.
#
#   2. on the device:     run(command="bash benchmarks/gpu/check.sh", carry=[".whl/gpu-check", ".cache/bench-smollm2"],
#                             timeout_s=540)
#      Results come back from $OUT: gpu-check.json, gpu-check.md (the section for BENCHMARKS.md), log.txt.
#
#   bash benchmarks/gpu/check.sh overhead [ARGS]   on the device instead of the check: benchmarks/overhead.py on the
#                                            GPU (--device cuda, the carried tokenizer, random weights; ARGS are
#                                            more of its options, e.g. --seq-lens 1024 2048 4096 --repeats 5)
#   bash benchmarks/gpu/check.sh --dry-run   the same code on the CPU at test sizes (a test runs it); installs
#                                            nothing, writes to $OUT (default /tmp/sstoken-gpu-check-dry-run)
#
# Models have random weights in real shapes (step cost and numerics depend on shapes, not values; no weights
# could travel anyway). The GPU machine has no network: Hub kernels are off (USE_HUB_KERNELS=0) and the Hub is
# offline; wheels install into /tmp/site and the project runs from src/.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL_DIR=.cache/bench-smollm2
WHEEL_DIR=.whl/gpu-check  # a folder of its own: other tools keep other versions in .whl/
# The CPU venv's versions (what CI tests); transformers 5.25 needs huggingface_hub 2.4, which needs httpx2.
WHEELS=(transformers==5.25.0 trl==1.16.0 peft==0.21.2 accelerate==1.16.0 datasets==5.2.0 huggingface_hub==2.4.0
        httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 regex==2026.12.2 dill==0.4.1 multiprocess==0.70.19
        liger-kernel==0.8.5 bitsandbytes==0.50.2)
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "${1:-run}" = prepare ]; then
    rm -rf "$WHEEL_DIR" && mkdir -p "$WHEEL_DIR"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$WHEEL_DIR" "${WHEELS[@]}"
    PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" python - "$MODEL_DIR" "$WHEEL_DIR" "${WHEELS[@]}" <<'EOF'
import importlib.metadata, re, shutil, sys, zipfile
from pathlib import Path
from common import hf_checkpoint  # benchmarks/common.py

model_dir, wheel_dir, pins = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
for pin in pins:  # the GPU should run what CI tests
    name, version = pin.split("==")
    try:
        here = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        here = "not installed"
    if here != version:
        print(f"note: {name} is {here} here, {version} in the GPU wheels")
# bitsandbytes ships one library per CUDA / ROCm / XPU version (129 MB unpacked); the image's torch is CUDA 13.
(bnb,) = wheel_dir.glob("bitsandbytes-*.whl")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d+)\.so$")
slim = bnb.with_suffix(".slim")
with zipfile.ZipFile(bnb) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # the record lists only what the wheel holds
            data = "".join(line for line in data.decode().splitlines(True)
                           if not drop.search(line.split(",")[0])).encode()
        dst.writestr(item, data)
slim.replace(bnb)
source = Path(hf_checkpoint(None, Path("/tmp"), quick=False))  # the embedded model as a plain checkpoint
model_dir.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():
    if path.suffix != ".safetensors" and path.name != "DONE":  # everything but the weights
        shutil.copy2(path, model_dir / path.name)
print("model config and tokenizer in", model_dir, sorted(p.name for p in model_dir.iterdir()))
EOF
    du -sh "$WHEEL_DIR" "$MODEL_DIR"
    exit 0
fi

if [ "${1:-run}" = --dry-run ]; then
    OUT=${OUT:-/tmp/sstoken-gpu-check-dry-run}
    mkdir -p "$OUT"
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    exec "$PYTHON" benchmarks/gpu/check.py --dry-run --out "$OUT"
fi

OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEEL_DIR"/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
    | tee "$OUT/log.txt"
"$PYTHON" -c "import torch, transformers, trl, peft, datasets, sstoken.training.trainer; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)" \
    2>&1 | tee -a "$OUT/log.txt"
if [ "${1:-run}" = overhead ]; then
    shift
    "$PYTHON" benchmarks/overhead.py --device cuda --model "$MODEL_DIR" --random-init \
        --out "$OUT/overhead-cuda.json" --markdown "$OUT/overhead-cuda.md" "$@" 2>&1 \
        | grep --line-buffered -v -E "it/s\]|examples/s\]|Warning|warnings.warn" | tee -a "$OUT/log.txt"
else
    "$PYTHON" benchmarks/gpu/check.py --out "$OUT" --model "$MODEL_DIR" 2>&1 \
        | grep --line-buffered -v -E "it/s\]|examples/s\]|Warning|warnings.warn" | tee -a "$OUT/log.txt"
fi
