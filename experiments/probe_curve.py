"""The recall probe's training curve: mean training loss every --every steps and held-out accuracy
every --eval-every, for one setting and a few seeds (the probe's model and recipe otherwise). It
shows the plateau behind the multi-key results: the loss sits at chance (ln alphabet) and then
falls within ~150 steps, so a fixed budget of 300 steps reads wherever each draw is on it.

    python experiments/probe_curve.py --keys 2 --distance 5 --seeds 1 3 --steps 900 --read-gain 1

--read-gain sets the scale of the state's attention to the tokens at that multiple of
sqrt(dim_head) (the model's default: STATE_READ_GAIN; 1 is an earlier release);
--gate-write how the fixed gate writes (the model's default, "normalized": z * sqrt(1 - g^2);
"convex", the paper's z * (1 - g), is where the README's curves were logged: add
`--gate-write convex` to reproduce them).
"""

from __future__ import annotations

import argparse

import torch
from probe_ablation import read_gain, train  # beside this one: the rescaling, the training loop

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.evaluate.probes import BETAS, RecallTask, probe_config, recall_accuracy
from blockrecurrent.model.config import GATE_WRITES
from blockrecurrent.model.transformer import STATE_READ_GAIN


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=2)
    ap.add_argument("--distance", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--read-gain", type=float, default=STATE_READ_GAIN)
    ap.add_argument("--gate-write", choices=GATE_WRITES, default=preset("probe").gate_write)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--betas", type=float, nargs=2, default=list(BETAS),
                    help="Adam's betas (default: the trainer's %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = preset("probe", gate_write=args.gate_write)
    task = RecallTask(block_width=base.block_width, num_keys=args.keys, distance=args.distance)
    for seed in args.seeds:
        torch.manual_seed(seed)  # the same draw as `brt probe --seeds SEED`
        model = BlockRecurrentTransformer(probe_config(base, task, recurrent=True))
        read_gain(args.read_gain)(model)
        losses = []

        def log(step, loss, model=model, losses=losses, seed=seed):
            losses.append(loss)
            if step % args.every == 0:
                line = f"seed {seed} step {step}: loss {sum(losses) / len(losses):.3f}"
                losses.clear()
                if step % args.eval_every == 0:
                    line += f", accuracy {recall_accuracy(model, task):.3f}"
                print(line, flush=True)
        train(model, task, steps=args.steps, seed=seed, betas=args.betas, callback=log)


if __name__ == "__main__":
    main()
