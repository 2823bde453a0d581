"""MQAR on a CPU budget: full attention, Slide and the recurrent model side by side.

Trains one fresh model per (setting, model, seed) with blockrecurrent.evaluate.mqar (the
generator of the Zoology study, Arora et al. 2023), appends every row to OUT/mqar.json as it
finishes (so several invocations build one table) and rewrites OUT/mqar.md and OUT/mqar.png
from all the rows there. --curve logs the training loss and a held-out accuracy every N steps
(OUT/curves.jsonl), to see where a budget ends on the learning curve.

    python experiments/mqar.py --grid 256:16 --models full slide recurrent --steps 600 \
        --batch-size 32 --seeds 0 --out docs/mqar-runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from blockrecurrent.evaluate.mqar import (
    MODELS,
    MQARTask,
    cache_bytes,
    mqar_accuracy,
    mqar_base,
    mqar_config,
    state_bytes,
    train_mqar,
    write_mqar_report,
)
from blockrecurrent.model.transformer import BlockRecurrentTransformer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs="+", default=["256:16"], help="seq_len:pairs settings")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=32, help="block_width W of slide/recurrent")
    p.add_argument("--state-vectors", type=int, default=32, help="S of the recurrent layer")
    p.add_argument("--num-test", type=int, default=1024)
    p.add_argument("--curve", type=int, default=0, metavar="N",
                   help="every N steps log the loss and accuracy on 256 held-out sequences")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/mqar")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = mqar_base(dim=args.dim, heads=args.heads, dim_head=args.dim // args.heads,
                     block_width=args.window, num_state_vectors=args.state_vectors)
    path = out / "mqar.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for cell in args.grid:
        n, k = (int(x) for x in cell.split(":"))
        task = MQARTask(seq_len=n, num_pairs=k)
        reach = task.reach(base.block_width, base.depth, num_sequences=args.num_test)
        for name in args.models:
            config = mqar_config(base, task, name)
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = BlockRecurrentTransformer(config)
                tag = f"{name} n={n} K={k} dim={args.dim} W={config.block_width} " \
                      f"S={args.state_vectors} seed={seed} lr={args.lr} bs={args.batch_size}"
                recent: list[float] = []
                clock = dict(evals=0.0)  # seconds spent on the curve's evaluations

                def curve(step, loss, model=model, tag=tag, task=task, recent=recent, clock=clock):
                    recent.append(loss)
                    if args.curve and (step % args.curve == 0 or step == args.steps):
                        e0 = time.perf_counter()
                        acc = mqar_accuracy(model, task, num_sequences=256, seed=999)
                        line = dict(run=tag, step=step, loss=sum(recent) / len(recent),
                                    acc=acc, t=time.perf_counter() - clock["t0"])
                        recent.clear()
                        clock["evals"] += time.perf_counter() - e0
                        print(json.dumps(line), flush=True)
                        with open(out / "curves.jsonl", "a") as f:
                            f.write(json.dumps(line) + "\n")

                t0 = clock["t0"] = time.perf_counter()
                loss = train_mqar(model, task, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, weight_decay=args.weight_decay, seed=seed,
                                  callback=curve)
                train_s = time.perf_counter() - t0 - clock["evals"]
                acc = mqar_accuracy(model, task, num_sequences=args.num_test)
                sb = state_bytes(config)
                row = dict(model=name, seq_len=n, num_pairs=k, vocab=task.vocab,
                           power_a=task.power_a, dim=config.dim, depth=config.depth,
                           window=config.block_width,
                           state_vectors=config.num_state_vectors if sb else 0,
                           state_bytes=sb, inference_bytes=sb + cache_bytes(config, n),
                           seed=seed, accuracy=acc, chance=task.chance, final_loss=loss,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, train_seconds=train_s,
                           seconds_per_step=train_s / args.steps, **reach,
                           slide_window=base.block_width)
                print(f"{tag}: accuracy {acc:.3f} (loss {loss:.3f}, {train_s:.0f} s)",
                      flush=True)
                rows.append(row)
                path.write_text(json.dumps(rows, indent=1))
                write_mqar_report(rows, out)


if __name__ == "__main__":
    main()
