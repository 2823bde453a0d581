"""Why do many short lanes train better than a few long ones at equal tokens? Two causes,
separated: gradients through the window cache across the blocks of a segment, or the number of
documents in each batch.

    python experiments/batch_shape.py --layouts 4x512 4x512:detach 16x128 --seed 0 --threads 1

Each layout trains `configs/small.toml` (Slide by default, `--baseline none` for the recurrent
model) for the same optimizer steps and tokens, then reports the validation bits/byte over
`--eval-tokens` of validation text. `LANESxSEGMENT` is the batch shape; `:detach` runs each
segment block by block with the memories detached between blocks (the same batches as without
it, the gradients of one-block segments). So `4x512:detach` against `4x512` isolates gradient
flow through the cache, and `16x128` against `4x512:detach` isolates the number of lanes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from blockrecurrent.train.settings import load_train_config, resolve_model_config
from blockrecurrent.train.train_data import build_data
from blockrecurrent.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def block_by_block(model, block_width: int):
    """A train_model that runs a segment one block at a time, memories detached in between."""
    def run(seq, xl_memories=None, states=None, reset=None):
        logits = []
        for start in range(0, seq.shape[1], block_width):
            out, xl_memories, states = model(seq[:, start:start + block_width],
                                             xl_memories=xl_memories, states=states,
                                             reset=reset if start == 0 else None)
            logits.append(out)
        return torch.cat(logits, 1), xl_memories, states
    return run


def run_layout(layout: str, args) -> dict:
    shape, _, mode = layout.partition(":")
    lanes, segment = (int(x) for x in shape.split("x"))
    overrides = [f"batch_size={lanes}", f"model.max_seq_len={segment}", f"seed={args.seed}",
                 f"max_steps={args.steps}", f"eval_tokens={args.eval_tokens}",
                 f"eval_interval={args.steps}", "save_interval=0",
                 f"out_dir={args.out}/{layout.replace(':', '-')}-s{args.seed}"]
    overrides += args.set
    if args.baseline != "none":
        overrides.append(f"baseline={args.baseline}")
    model_config, cfg = load_train_config(ROOT / "configs/small.toml", None, overrides)
    tokenizer, train_corpus, val_corpus = build_data(cfg)
    model_config = resolve_model_config(model_config, cfg, tokenizer.vocab_size)
    trainer = Trainer(model_config, cfg, train_corpus, val_corpus, tokenizer)
    if mode == "detach":
        trainer.train_model = block_by_block(trainer.train_model, model_config.block_width)
    elif mode:
        raise ValueError(f"unknown layout mode {mode!r}")
    t0 = time.perf_counter()
    losses = []
    while trainer.step < args.steps:
        loss, _ = trainer.train_step()
        losses.append(loss)
    result = {"layout": layout, "set": args.set, "seed": args.seed, "baseline": args.baseline,
              "steps": args.steps, "train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
              **trainer.evaluate(), "eval_docs": len(trainer.eval_corpus),
              "eval_bytes": int(trainer.eval_corpus.total_bytes),
              "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["4x512", "4x512:detach", "16x128"])
    ap.add_argument("--baseline", default="slide", help="slide, or none for the recurrent model")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="more settings, e.g. model.block_width=64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-tokens", type=int, default=131072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/batch_shape")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run_layout(layout, args) for layout in args.layouts]
    print("\n| layout | seed | val bits/byte | train loss (last 50) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['seed']} | {r['val_bpb']:.3f} "
              f"| {r['train_loss_last50']:.3f} |")


if __name__ == "__main__":
    main()
