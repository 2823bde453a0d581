"""Why the state learns: the recall probe under the initialisations and per-parameter learning
rates this project tried, in one script, one fresh model per (variant, K, distance, seed), the
probe's settings otherwise (2 layers, dim 64, W = S = 16, layer 2 recurrent, Adam 2e-3 with the
trainer's betas (0.9, 0.95), batch 32, 300 steps). Every figure of the variants below but the
betas table was measured with torch's default betas: add `--betas 0.9 0.999` to reproduce it.

    python experiments/probe_ablation.py --variants default convex --keys 2 4 --distances 6 \
        --seeds 0 1 2 3 --betas 0.9 0.95

The gate's write: default is the model's own, the normalized write z * sqrt(1 - g^2); convex is
the paper's z * (1 - g), the previous default. Every other variant was measured with the convex
write and keeps it, so that it reproduces the README's figures.

    python experiments/probe_ablation.py --variants default convex --keys 2 4 --distances 6 \
        --seeds 0 1 2 3 --betas 0.9 0.999

The state's read of the tokens:
- default: the model's own init (linear layers at fan-in scale, gate biases spread over 2-64
  block timescales, the candidate projection at CANDIDATE_GAIN x fan-in scale, the state's
  attention to the tokens at STATE_READ_GAIN x sqrt(dim_head)); convex: the same, convex write;
- read-gain-1, read-gain-2, read-gain-8: convex with that attention's scale at that multiple
  of sqrt(dim_head) instead; read-gain-1 is an earlier release (unit spread).

    python experiments/probe_ablation.py --variants read-gain-1 convex read-gain-8 --keys 2 \
        --distances 5 --seeds 0 1 2 3

On this release's read (measured at d = 6, where 300 steps end before the last draws learn):
- log-scales: every attention scale of the cell learned as exp(log scale), so that Adam's steps
  are relative to the scale, as Adafactor's are in the official code;
- scales-lr-10: those scales at 10x --lr; cell-2: the cell at 2x --lr; all-2: every parameter.

    python experiments/probe_ablation.py --variants convex read-gain-8 log-scales scales-lr-10 \
        cell-2 all-2 --keys 2 4 --distances 6 --seeds 0 1

Every other variant was measured on an earlier release and keeps its state read at gain 1, so
that it reproduces the figures in the README (read-gain-1 is their baseline).

Initialisations (the same architecture except paper-cell; otherwise only the initial values differ):
- gpt2: what this project used first: every weight N(0, 0.02) with GPT-2's 1/sqrt(2 depth)
  on the residual projections, fixed-gate biases N(0, 0.1) (g near 0.5);
- fan-in-g0.5: linear layers at std 1/sqrt(fan_in) (the official code's variance scaling),
  embeddings 0.02, but the paper's gate biases N(0, 0.1);
- gain-1, gain-2, gain-8: the candidate projection rescaled to that multiple of fan-in scale
  (the same draw, scaled);
- paper-cell: the paper's cell (state self-attention on) at gain 1.

    python experiments/probe_ablation.py --variants gpt2 fan-in-g0.5 read-gain-1 --distances 2 4 6
    python experiments/probe_ablation.py --variants paper-cell gain-1 gain-2 read-gain-1 \
        --keys 2 --distances 4 --seeds 0 1

Learning rates (only Adam's rate for some parameters differs; the library's probes train every
parameter at one rate, so this script trains with its own loop, `train` below, which with no
per-parameter rates gives the same weights as blockrecurrent.evaluate.probes.train_recall):
- all-0.5: every parameter at half of --lr (`brt probe --lr 1e-3` on an earlier release);
- below-0.5, below-0.25: the layers below the recurrent layer (the state reads their output)
  at that fraction, everything else at --lr;
- below-mlp-0.5: only their MLPs; cell-0.5: the recurrent layer's attention (the cell's token
  and state sides); not-cell-0.5: everything except the cell.

    python experiments/probe_ablation.py --variants read-gain-1 all-0.5 below-0.5 --keys 2 \
        --distances 5 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.evaluate.probes import (
    BETAS,
    RecallTask,
    probe_config,
    probe_table,
    recall_accuracy,
    task_grid,
)
from blockrecurrent.evaluate.synthetic import IGNORE
from blockrecurrent.model.cell import STATE_READ, FixedGate
from blockrecurrent.model.transformer import CANDIDATE_GAIN, STATE_READ_GAIN


@torch.no_grad()
def gpt2_init(model: BlockRecurrentTransformer) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    depth = model.config.depth
    for layer in model.layers:
        out = layer.attn.token_out if layer.recurrent else layer.attn.out
        for w in (out.weight, layer.mlp[2].weight):
            nn.init.normal_(w, std=0.02 / (2 * depth) ** 0.5)
    paper_gate(model)


@torch.no_grad()
def paper_gate(model: BlockRecurrentTransformer) -> None:
    for m in model.modules():
        if isinstance(m, FixedGate):
            nn.init.normal_(m.bias, std=0.1)


def candidate_gain(gain: float):
    @torch.no_grad()
    def init(model: BlockRecurrentTransformer) -> None:
        for cell in model.recurrent_cells:
            cell.state_out.weight.mul_(gain / CANDIDATE_GAIN)
    return init


def read_gain(gain: float):
    @torch.no_grad()
    def init(model: BlockRecurrentTransformer) -> None:
        for cell in model.recurrent_cells:
            cell.scales[STATE_READ].mul_(gain / STATE_READ_GAIN)
    return init


LrScale = Callable[[str], float]  # parameter name -> learning-rate multiplier


def adam_groups(model: nn.Module, lr: float, lr_scale: LrScale | None = None) -> list[dict]:
    """Adam parameter groups: each parameter at `lr * lr_scale(name)` (all at `lr` without it)."""
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        factor = 1.0 if lr_scale is None else lr_scale(name)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"lr_scale({name!r}) must be a positive number, got {factor!r}")
        groups.setdefault(float(factor), []).append(param)
    return [{"params": params, "lr": lr * factor} for factor, params in groups.items()]


def train(model: nn.Module, task: RecallTask, *, steps: int = 300, batch_size: int = 32,
          lr: float = 2e-3, seed: int = 0, betas=BETAS, lr_scale: LrScale | None = None,
          callback: Callable[[int, float], None] | None = None) -> float:
    """probes.train_recall (the same batches, the same Adam steps) with a learning rate per
    parameter, `lr * lr_scale(name)`, and `callback(step, loss)` after every step (probe_curve.py
    logs the curve with it). Returns the last training loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(adam_groups(model, lr, lr_scale), lr=lr,
                           betas=(float(betas[0]), float(betas[1])))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        seq, targets = task.batch(batch_size, g)
        logits = model(seq)[0]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step, loss.item())
    return loss.item()


def lr_scale(factor: float, picks):
    """`factor` for the parameters that `picks(layer_index or None, part)` selects, else 1."""
    def scale(name: str) -> float:
        parts = name.split(".")
        layer, part = (int(parts[1]), parts[2]) if parts[0] == "layers" else (None, parts[0])
        return factor if picks(layer, part) else 1.0
    return scale


CELL = min(preset("probe").recurrent_layers) - 1  # index of the probe model's recurrent layer


def below(layer, part):
    return layer is not None and layer < CELL


def below_mlp(layer, part):
    return below(layer, part) and part == "mlp"


def cell(layer, part):
    return layer == CELL and part == "attn"


def no_init(model):
    pass


def previous(init=no_init):
    """`init` on an earlier release's state read (gain 1), where the variants other than
    default, convex and read-gain-* were measured (README), so that they reproduce those figures."""
    def both(model):
        read_gain(1)(model)
        init(model)
    return both


class Exp(nn.Module):
    """scales = exp(log_scales): Adam's steps become relative to the scale (as Adafactor's are)."""
    def forward(self, x):
        return x.exp()

    def right_inverse(self, y):
        return y.log()


@torch.no_grad()
def log_scales(model: BlockRecurrentTransformer) -> None:
    from torch.nn.utils import parametrize
    for cell in model.recurrent_cells:
        parametrize.register_parametrization(cell, "scales", Exp())


def scales_lr(factor: float):
    return lambda name: factor if "scales" in name else 1.0


CONVEX = {"gate_write": "convex"}  # the write every variant but default was measured with

# name -> (probe model settings, init applied after the model's own, lr_scale or None)
VARIANTS = {"default": ({}, no_init, None),
            "convex": (CONVEX, no_init, None),
            "gpt2": (CONVEX, previous(gpt2_init), None),
            "fan-in-g0.5": (CONVEX, previous(paper_gate), None),
            **{f"read-gain-{g}": (CONVEX, read_gain(g), None) for g in (1, 2, 8)},
            **{f"gain-{g}": (CONVEX, previous(candidate_gain(g)), None) for g in (1, 2, 8)},
            "paper-cell": ({**CONVEX, "state_self_attention": True}, previous(candidate_gain(1)),
                           None),
            "log-scales": (CONVEX, log_scales, None),
            "scales-lr-10": (CONVEX, no_init, scales_lr(10.0)),
            "cell-2": (CONVEX, no_init, lr_scale(2.0, cell)),
            "all-2": (CONVEX, no_init, lr_scale(2.0, lambda layer, part: True)),
            "all-0.5": (CONVEX, previous(), lr_scale(0.5, lambda layer, part: True)),
            "below-0.5": (CONVEX, previous(), lr_scale(0.5, below)),
            "below-0.25": (CONVEX, previous(), lr_scale(0.25, below)),
            "below-mlp-0.5": (CONVEX, previous(), lr_scale(0.5, below_mlp)),
            "cell-0.5": (CONVEX, previous(), lr_scale(0.5, cell)),
            "not-cell-0.5": (CONVEX, previous(), lr_scale(0.5, lambda layer, part:
                                                          not cell(layer, part)))}


def probe_variant(name: str, args, log=print) -> list[dict]:
    """One fresh recurrent probe model per (K, distance, seed) of the variant, trained by `train`
    with the variant's init and learning rates; rows as run_probes writes them."""
    settings, init, scale = VARIANTS[name]
    base = preset("probe", **settings)
    rows = []
    for task in task_grid(base.block_width, "keys", args.keys, args.distances):
        for seed in args.seeds:
            config = probe_config(base, task, recurrent=True)
            torch.manual_seed(seed)
            model = BlockRecurrentTransformer(config)
            init(model)
            t0 = time.perf_counter()
            loss = train(model, task, steps=args.steps, lr=args.lr, seed=seed, betas=args.betas,
                         lr_scale=scale)
            acc = recall_accuracy(model, task)
            rows.append(dict(model="recurrent", kind=task.kind, num_keys=task.num_keys,
                             distance=task.distance, queries=task.queries, lead=task.lead,
                             seed=seed, accuracy=acc, chance=task.chance, final_loss=loss,
                             beyond_reach=task.beyond_reach(config.depth, config.window),
                             steps=args.steps, betas=list(args.betas), mixed=False,
                             seconds=time.perf_counter() - t0))
            log(f"[{name}] recurrent keys K={task.num_keys} d={task.distance} seed={seed}: "
                f"accuracy {acc:.3f} (loss {loss:.3f}, {rows[-1]['seconds']:.0f} s)")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--keys", type=int, nargs="+", default=[1])
    ap.add_argument("--distances", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--betas", type=float, nargs=2, default=list(BETAS),
                    help="Adam's betas (default: the trainer's %(default)s)")
    ap.add_argument("--out", default="runs/probe-ablation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        rows = probe_variant(name, args, log=lambda s: print(s, flush=True))
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        print(f"\n{name}:\n{probe_table(rows)}\n", flush=True)


if __name__ == "__main__":
    main()
