"""Tokens per second and peak memory per process of a short training run: DDP against FSDP,
with or without activation checkpointing. Arguments are those of
`python -m blockrecurrent.train`; run it under torchrun like the trainer:

    torchrun --standalone --nproc_per_node=2 benchmarks/train_memory.py \
        --config configs/small.toml device=cpu max_steps=12 log_interval=2 eval_tokens=0 \
        save_interval=0 parallel=fsdp out_dir=runs/mem-fsdp

Each rank prints one JSON line: its peak memory (CPU: peak resident set, also less the level
before training; CUDA: peak allocated) and, on rank 0, the median tokens/s of the logged
windows after the first (which holds the warm-up)."""

import json
import os
import statistics
import sys
from pathlib import Path

import torch

from blockrecurrent.memory import proc_status_kib
from blockrecurrent.train import trainer as T
from blockrecurrent.train.settings import load_train_config


def main(argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    before = proc_status_kib("VmRSS")
    code = T.main(argv)
    if code:
        return code
    record = {"rank": rank, "peak_rss_mib": round(proc_status_kib("VmHWM") / 1024, 1),
              "peak_rss_above_start_mib": round((proc_status_kib("VmHWM") - before) / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        record["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if rank == 0:
        settings = [a for a in argv if "=" in a]
        config = next((argv[i + 1] for i, a in enumerate(argv) if a == "--config"), None)
        out = Path(load_train_config(config, overrides=settings)[1].out_dir)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        rates = [r["tokens_per_s"] for r in map(json.loads, lines) if r.get("event") == "train"][1:]
        record["tokens_per_s_median"] = round(statistics.median(rates), 1) if rates else None
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
