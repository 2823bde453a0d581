#!/usr/bin/env bash
# The GPU benchmark (issue 5; decoding: issue 13): the paper's 150M configuration (12 layers, E=1024, W=S=512,
# 4096-token segments, 32k vocabulary) against Slide and XL, bf16 autocast and fp32, streams of
# 4k to 64k tokens, with the matmul peak measured in the same run. Needs a CUDA build of torch in
# the active environment (`pip install -e .` there). Writes bench.json and bench.md to OUT_DIR.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # default runs/gpu
set -euo pipefail
out=${1:-runs/gpu}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m blockrecurrent.bench --preset paper-150m --device cuda --batch-size 4 \
    --lengths 4096 16384 65536 --dtypes bf16 fp32 --repeats 3 \
    --json "$out/bench.json" --md "$out/bench.md"
# Cached decoding (issue 13): tokens/s at batch 1, 8 and 32 for the fast, legacy and compiled
# steps, against the memory-read bound measured on the card in the same run.
python -m blockrecurrent.bench --preset paper-150m --device cuda --decode --compile \
    --decode-batches 1 8 32 --json "$out/decode.json" --md "$out/decode.md"
