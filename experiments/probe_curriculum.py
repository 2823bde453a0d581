"""Is multi-key recall a capacity limit or an optimisation barrier? Train the recall probe's
model first at a short distance, then at the target distance, and compare with training at the
target distance only.

    python experiments/probe_curriculum.py --keys 2 --distance 4 --first 300 --then 300 --threads 1

Prints the accuracy at the short and the target distance after each stage. Trained from scratch
at d = 4, 2 keys stay at chance after 1,000 steps (`brt probe --keys 2 --distances 4 --steps
1000 --models recurrent`); after 300 steps at d = 2 the same model learns d = 4 in 300 more:
the state can hold and keep two keys, but from scratch the signal at d = 4 is too weak to find
how to write them.
"""

from __future__ import annotations

import argparse

import torch

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.evaluate.probes import (
    BETAS,
    RecallTask,
    probe_config,
    recall_accuracy,
    train_recall,
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=2)
    ap.add_argument("--start", type=int, default=2, help="distance of the first stage")
    ap.add_argument("--distance", type=int, default=4, help="target distance")
    ap.add_argument("--first", type=int, default=300, help="steps at --start")
    ap.add_argument("--then", type=int, default=300, help="steps at --distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--betas", type=float, nargs=2, default=list(BETAS),
                    help="Adam's betas (default: the trainer's %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = preset("probe")
    easy = RecallTask(block_width=base.block_width, num_keys=args.keys, distance=args.start)
    hard = RecallTask(block_width=base.block_width, num_keys=args.keys, distance=args.distance)
    torch.manual_seed(args.seed)
    model = BlockRecurrentTransformer(probe_config(base, hard, recurrent=True))
    for task, steps, seed in ((easy, args.first, args.seed), (hard, args.then, args.seed + 1)):
        train_recall(model, task, steps=steps, seed=seed, betas=args.betas)
        print(f"K={args.keys}, after {steps} steps at d={task.distance}: "
              f"d={easy.distance} {recall_accuracy(model, easy):.3f}, "
              f"d={hard.distance} {recall_accuracy(model, hard):.3f}", flush=True)


if __name__ == "__main__":
    main()
