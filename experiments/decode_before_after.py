"""Decoding speed of an earlier commit against this checkout, in one process, the same weights,
interleaved round by round (medians over rounds; noise on a shared machine hits both alike).

The earlier package is imported under another name from a copy of its tree:

    mkdir -p /tmp/old && git archive 71478d3 blockrecurrent | tar -x -C /tmp/old \
        && mv /tmp/old/blockrecurrent /tmp/old/brt_old
    python experiments/decode_before_after.py /tmp/old --threads 1 --rounds 15

Greedy decoding of the "small" preset (random weights, seed 0) after a 1,024-token prompt, 64
new tokens per round, at batch 1, 8 and 32, through each package's `generate` (the default
decoding path). Both must produce the same tokens (checked before timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time

import torch

from blockrecurrent import BlockRecurrentConfig, BlockRecurrentTransformer, preset
from blockrecurrent.generate.generation import generate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old_root", help="folder holding the earlier package as brt_old/")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args(argv)
    sys.path.insert(0, args.old_root)  # the earlier tree, importable as brt_old
    old_pkg = importlib.import_module("brt_old")
    old_generate = importlib.import_module("brt_old.generation").generate
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    new = BlockRecurrentTransformer(preset("small")).eval()
    known = {f.name for f in dataclasses.fields(old_pkg.BlockRecurrentConfig)}
    later = {k: v for k, v in new.config.to_dict().items() if k not in known}
    # Fields added since must be at values that build the earlier model (their defaults).
    assert all(getattr(BlockRecurrentConfig(), k) == v for k, v in later.items()), later
    old = old_pkg.BlockRecurrentTransformer(old_pkg.BlockRecurrentConfig(
        **{k: v for k, v in new.config.to_dict().items() if k in known})).eval()
    old.load_state_dict(new.state_dict())
    gen = torch.Generator().manual_seed(0)
    print(f"small preset, {args.threads} thread(s), torch {torch.__version__}, "
          f"{args.rounds} rounds of 64 tokens")
    print(f"{'batch':>5} | {'before tok/s':>12} | {'after tok/s':>11} | {'after/before':>12}")
    for b in args.batches:
        p = torch.randint(0, new.config.num_tokens, (b, 1024), generator=gen)
        s_old = old_generate(old, p, 0, return_state=True)
        s_new = generate(new, p, 0, return_state=True)
        a = old_generate(old, None, 16, do_sample=False, past=s_old, return_state=True)
        c = generate(new, None, 16, do_sample=False, past=s_new, return_state=True)
        assert torch.equal(a.tokens, c.tokens), "the two packages decode differently"
        t_old, t_new = [], []
        for _ in range(args.rounds):
            for fn, model, start, acc in ((old_generate, old, s_old, t_old),
                                          (generate, new, s_new, t_new)):
                t0 = time.perf_counter()
                fn(model, None, 64, do_sample=False, past=start, return_state=True)
                acc.append(b * 64 / (time.perf_counter() - t0))
        ratio = statistics.median(n / o for o, n in zip(t_old, t_new, strict=True))
        print(f"{b:>5} | {statistics.median(t_old):>12,.0f} | {statistics.median(t_new):>11,.0f} "
              f"| {ratio:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
