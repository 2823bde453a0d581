"""Peak memory and time of one training segment (forward, loss, backward) with and without
per-layer activation checkpointing (`activation_checkpointing = true`).

    python benchmarks/activation_memory.py --preset small --batch-size 1
    python benchmarks/activation_memory.py --preset paper-150m --batch-size 1   # minutes on a CPU

CPU memory is the peak resident set above the level before the segment
(blockrecurrent.memory.PeakMemory, large blocks mmapped so that freed tensors leave at
once); CUDA: peak allocated above the start."""

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F

from blockrecurrent import BlockRecurrentTransformer
from blockrecurrent.memory import PeakMemory
from blockrecurrent.model.config import PRESETS, preset
from blockrecurrent.train.distributed import checkpoint_layers


def segment(model, tokens):
    logits, _, _ = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = preset(args.preset)
    tokens = torch.randint(0, config.num_tokens, (args.batch_size, config.max_seq_len + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    meter, results = PeakMemory(device), {}
    with meter.exact():
        for checkpointed in (False, True):
            torch.manual_seed(0)
            model = BlockRecurrentTransformer(config).to(device).train()
            if checkpointed:
                checkpoint_layers(model)
            segment(model, tokens)  # warm-up: allocates the gradients, loads lazy modules
            t0 = time.perf_counter()
            peak = meter.measure(functools.partial(segment, model, tokens))
            results["checkpointed" if checkpointed else "plain"] = {
                "peak_mib": None if peak is None else round(peak / 2**20, 1),
                "seconds": round(time.perf_counter() - t0, 2)}
            del model
    plain, ckpt = results["plain"]["peak_mib"], results["checkpointed"]["peak_mib"]
    if plain and ckpt is not None:
        results["saved_fraction"] = round(1 - ckpt / plain, 3)
    print(json.dumps({"preset": args.preset, "batch_size": args.batch_size, "device": str(device),
                      "segment": config.max_seq_len, "method": meter.method, **results}))


if __name__ == "__main__":
    main()
