"""How far does the recall probe's memory reach beyond the distance it was trained at?

    python experiments/length_generalisation.py --variant baseline --train 3 --seeds 0
    python experiments/length_generalisation.py --variant baseline --train mixed
    python experiments/length_generalisation.py --variant baseline --train 3 \
        --score 3 --score-lead 47     # key 3 blocks back, but as far from the start as d=48

Trains the recall probe's model (preset "probe": 2 layers, dim 64, W = S = 16, layer 2
recurrent; 1 key, 300 steps, batch 32, the probe's recipe, probes.train_recall) under a named
variant, then scores it (probes.recall_accuracy, 1,024 held-out sequences) with the key at the
trained distance and at 4x / 16x (and 64x for --train mixed) of it, with the probe's lead of 2
filler blocks (--score-lead changes it). `--train 3` trains with the key 3 blocks back and scores
at 3 / 12 / 48; `--train mixed` trains on distances 1..6 in turn (`brt probe --mixed`) and
scores at 6 / 24 / 96 / 384. Prints a table and appends one JSON row per (variant, model, seed,
score distance) to OUT/results.jsonl. Torch runs on one thread unless --threads says otherwise.

A variant (VARIANTS) is config overrides over the probe preset plus:
- `leads`: the lead (filler blocks before the key) of the training batches cycles over these
  values, so the key's absolute position varies and the model sees states that have run for
  up to max(leads) + distance + 1 blocks (every batch backpropagates through the whole sequence);
- `max_blocks`: the longest timescale of the fixed gate's chrono bias init
  (cell.retention_bias; the library spreads 2..64 blocks), patched in while the model is built;
- `selective`: the fixed gate is swapped for SelectiveGate below (a prototype in this script,
  not a library option): the same normalized write, its retention made input-dependent.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import blockrecurrent.model.transformer as model_module
from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.evaluate.probes import RecallTask, probe_config, recall_accuracy, train_recall
from blockrecurrent.model.cell import retention_bias


class SelectiveGate(nn.Module):
    """The fixed gate made input-dependent (a prototype, swapped into the cell here): s' = s * g +
    z * sqrt(1 - g^2), g = sigmoid(b + W x), x = the gate's input (the state's reads of the
    tokens), b the fixed gate's chrono init, W = 0 at first (so it starts as the fixed gate)."""

    def __init__(self, cell: nn.Module, max_blocks: float):
        super().__init__()
        dim, input_dim = cell.state_out.weight.shape
        self.bias = nn.Parameter(retention_bias(dim, max_blocks))
        self.proj = nn.Linear(input_dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, state: Tensor, z: Tensor, gate_in: Tensor) -> Tensor:
        a = self.bias + self.proj(gate_in)
        g = torch.sigmoid(a)
        return state * g + z * (torch.sigmoid(-a) * (1 + g)).sqrt()


@dataclass(frozen=True)
class Variant:
    overrides: dict = field(default_factory=dict)  # model config fields over the probe preset
    leads: tuple[int, ...] = (2,)  # filler blocks before the key, cycled over training batches
    max_blocks: float | None = None  # fixed gate's longest initial timescale (None: library's)
    selective: bool = False  # swap the fixed gate for SelectiveGate


VARIANTS = {
    "baseline": Variant(),
    "convex": Variant(overrides=dict(gate_write="convex")),
    "lstm": Variant(overrides=dict(gate="lstm")),
    "timescale1024": Variant(max_blocks=1024.0),
    "timescale4096": Variant(max_blocks=4096.0),
    "randlead": Variant(leads=tuple(range(0, 9))),
    "selective": Variant(selective=True),
    "selective-timescale1024": Variant(selective=True, max_blocks=1024.0),
    "randlead64": Variant(leads=tuple(range(0, 65, 8))),
    "randlead64-timescale1024": Variant(leads=tuple(range(0, 65, 8)), max_blocks=1024.0),
    "randlead64-lstm": Variant(overrides=dict(gate="lstm"), leads=tuple(range(0, 65, 8))),
    "randlead64-selective": Variant(selective=True, leads=tuple(range(0, 65, 8))),
    "randlead64-selective-timescale1024": Variant(selective=True, max_blocks=1024.0,
                                                  leads=tuple(range(0, 65, 8))),
}
TRAIN = {"3": ((3,), (3, 12, 48)), "mixed": (tuple(range(1, 7)), (6, 24, 96, 384))}


@contextlib.contextmanager
def gate_timescale(max_blocks: float | None):
    """Build models with the fixed gate's biases spread up to `max_blocks` blocks."""
    if max_blocks is None:
        yield
        return
    saved = model_module.retention_bias
    model_module.retention_bias = functools.partial(retention_bias, max_blocks=max_blocks)
    try:
        yield
    finally:
        model_module.retention_bias = saved


def run(variant_name: str, train: str, score: tuple[int, ...], seed: int, model: str,
        steps: int, score_lead: int = 2) -> list[dict]:
    variant = VARIANTS[variant_name]
    distances, _ = TRAIN[train]
    base = preset("probe", **variant.overrides)
    tasks = [RecallTask(block_width=base.block_width, distance=d, lead=lead)
             for d in distances for lead in variant.leads]
    config = probe_config(base, max(tasks, key=lambda t: t.length), recurrent=model == "recurrent")
    torch.manual_seed(seed)
    with gate_timescale(variant.max_blocks):
        net = BlockRecurrentTransformer(config)
    if variant.selective:
        for cell in net.recurrent_cells:
            cell.gate = SelectiveGate(cell, variant.max_blocks or 64.0)
    t0 = time.perf_counter()
    loss = train_recall(net, tasks, steps=steps, seed=seed)
    train_s = time.perf_counter() - t0
    rows = []
    for d in score:
        task = RecallTask(block_width=base.block_width, distance=d, lead=score_lead)
        t1 = time.perf_counter()
        # long sequences in smaller batches (memory); the same 1,024 held-out sequences' count
        acc = recall_accuracy(net, task, batch_size=256 if task.length <= 1024 else 32)
        rows.append(dict(variant=variant_name, model=model, train=train, seed=seed,
                         steps=steps, distance=d, score_lead=score_lead, accuracy=acc,
                         final_loss=loss,
                         train_seconds=round(train_s, 1),
                         eval_seconds=round(time.perf_counter() - t1, 1)))
        print(f"{variant_name:14s} {model:9s} train={train:5s} seed={seed} d={d:3d}: "
              f"accuracy {acc:.3f} (loss {loss:.3f}, train {train_s:.0f} s, "
              f"eval {rows[-1]['eval_seconds']:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (variant, model, train, seed), accuracy per score distance."""
    def key(r):
        return r["variant"], r["model"], r["train"], r["seed"], r["score_lead"]
    lines = ["| variant | model | train | seed | score lead | accuracy at score distance (blocks)"
             " | train s |", "|---|---|---|---|---|---|---|"]
    for k in dict.fromkeys(map(key, rows)):
        rs = [r for r in rows if key(r) == k]
        accs = ", ".join(f"d={r['distance']}: {r['accuracy']:.2f}" for r in rs)
        lines.append(f"| {' | '.join(map(str, k))} | {accs} | {rs[0]['train_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", nargs="+", default=["baseline"], choices=sorted(VARIANTS))
    ap.add_argument("--train", choices=sorted(TRAIN), default="3",
                    help="'3': key 3 blocks back; 'mixed': distances 1..6 in turn")
    ap.add_argument("--score", type=int, nargs="+", default=None,
                    help="score distances (default: the trained one, 4x, 16x [, 64x for mixed])")
    ap.add_argument("--score-lead", type=int, default=2,
                    help="filler blocks before the key when scoring (default: the probe's 2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--models", nargs="+", default=["recurrent"], choices=["recurrent", "slide"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/length_generalisation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    score = tuple(args.score) if args.score else TRAIN[args.train][1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variant:
        for model in args.models:
            for seed in args.seeds:
                new = run(name, args.train, score, seed, model, args.steps, args.score_lead)
                rows += new
                with open(out / "results.jsonl", "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
    print(table(rows))


if __name__ == "__main__":
    main()
