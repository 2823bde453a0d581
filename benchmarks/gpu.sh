#!/usr/bin/env bash
# The GPU check. 1) The paper's 150M configuration (12 layers, E=1024, W=S=512,
# 4096-token segments, 32k vocabulary) against Slide and XL, bf16 autocast and fp32, streams of
# 4k to 64k tokens, with the matmul peak measured in the same run. 2) Activation checkpointing:
# peak memory of one 150M segment with and without. 3) With 2 or more GPUs, the NCCL paths:
# DDP and FSDP (bf16 mixed precision: bf16 weights, float32 gradient reduction) on the small
# config, tokens/s and peak memory per process; FSDP's losses against DDP's (bf16 tolerance);
# the sharded checkpoint of step 20 resumed to step 40 equal to the uninterrupted run. Before
# that, cached decoding: tokens/s at batch 1, 8 and 32 (fast, legacy and compiled steps)
# against the memory-read bound measured on the card in the same run.
# Needs a CUDA build of torch in the active environment (`pip install -e .` there). Writes
# bench.json, bench.md and the other results to OUT_DIR.
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
python benchmarks/activation_memory.py --preset paper-150m --batch-size 4 --device cuda \
    | tee "$out/activation_memory.json"

# Cached decoding: tokens/s at batch 1, 8 and 32 for the fast, legacy and compiled
# steps, against the memory-read bound measured on the card in the same run.
python -m blockrecurrent.bench --preset paper-150m --device cuda --decode --compile \
    --decode-batches 1 8 32 --json "$out/decode.json" --md "$out/decode.md"

ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -lt 2 ]; then
    echo "DDP/FSDP over NCCL skipped: $ngpu GPU (NCCL needs one GPU per process)" | tee "$out/parallel.txt"
    exit 0
fi
n=$(( ngpu < 8 ? ngpu : 8 ))
common=(--config configs/small.toml device=cuda dtype=auto max_steps=40 log_interval=1
        eval_interval=20 eval_tokens=16384 save_interval=20 keep_last=0)
for p in ddp fsdp; do
    rm -rf "$out/train-$p"
    torchrun --standalone --nproc_per_node="$n" benchmarks/train_memory.py "${common[@]}" \
        parallel=$p out_dir="$out/train-$p" | grep '^{"rank"' | tee "$out/train-$p.jsonl"
done
# Resume FSDP from its step-20 checkpoint (a copy, as an interruption there leaves it).
rm -rf "$out/resume-fsdp" && cp -r "$out/train-fsdp" "$out/resume-fsdp"
rm -rf "$out/resume-fsdp/checkpoints/step_0000040" "$out/resume-fsdp/model"
echo step_0000020 > "$out/resume-fsdp/checkpoints/latest"
torchrun --standalone --nproc_per_node="$n" -m blockrecurrent.train --resume "${common[@]}" \
    parallel=fsdp out_dir="$out/resume-fsdp" > /dev/null
python - "$out" <<'PY' | tee "$out/parallel.txt"
import json, sys
from pathlib import Path
import torch
from blockrecurrent import BlockRecurrentTransformer
out = Path(sys.argv[1])
def losses(run):
    return [r["loss"] for r in map(json.loads, (out / run / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"]
ddp, fsdp, resumed = losses("train-ddp"), losses("train-fsdp"), losses("resume-fsdp")
gap = max(abs(a - b) / a for a, b in zip(ddp, fsdp))
print(f"FSDP (bf16 weights) vs DDP (bf16 autocast) losses: largest relative gap {gap:.4f} (check: < 0.02)")
# GPU kernels (attention backward, atomics) need not be bit-reproducible: a float tolerance.
same = len(resumed) == len(fsdp) and max(abs(a - b) / a for a, b in zip(resumed, fsdp)) < 1e-3
print(f"FSDP resumed at step 20 matches the uninterrupted run (rel 1e-3): {same}")
a = BlockRecurrentTransformer.from_pretrained(out / "resume-fsdp" / "model").state_dict()
b = BlockRecurrentTransformer.from_pretrained(out / "train-fsdp" / "model").state_dict()
close = all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-3) for k in a)
print(f"FSDP exported weights close after the resume: {close}")
sys.exit(0 if gap < 0.02 and same and close else 1)
PY
