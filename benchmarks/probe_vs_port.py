"""The recall probe (blockrecurrent.evaluate.probes) for our model and the best-known PyTorch
port, with the same tasks, data, optimizer and steps, side by side on one machine.

    pip install --no-deps --target /tmp/portlib block-recurrent-transformer-pytorch==0.4.4 \\
        einops beartype
    python benchmarks/probe_vs_port.py --port-path /tmp/portlib --impl ours port --keys 1 2 4

Each (implementation, model, K, distance) trains a fresh model for 300 steps (Adam 2e-3 with the
trainer's betas, batch 32) on the probe's model config (2 layers, dim 64, 4 x 16 heads, W = S = 16,
layer 2 recurrent); "slide" is the same model without its recurrent layer. The port's window is
block-causal (a query sees all of the previous block and its own block up to itself), so two port
layers reach back two whole blocks: at distance <= 2 it can answer from the window alone. Writes
one JSON per implementation and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blockrecurrent import BlockRecurrentConfig, BlockRecurrentTransformer, preset
from blockrecurrent.evaluate.probes import BETAS, probe_table, run_probes


def port_factory(port_cls):
    def build(cfg: BlockRecurrentConfig):
        return port_cls(num_tokens=cfg.num_tokens, dim=cfg.dim, depth=cfg.depth,
                        dim_head=cfg.dim_head, heads=cfg.heads, max_seq_len=cfg.max_seq_len,
                        block_width=cfg.block_width, num_state_vectors=cfg.num_state_vectors,
                        recurrent_layers=tuple(cfg.recurrent_layers))
    return build


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port-path", help="folder holding block_recurrent_transformer_pytorch")
    ap.add_argument("--impl", nargs="+", default=["ours", "port"], choices=["ours", "port"])
    ap.add_argument("--kind", default="keys", choices=["keys", "pairs"])
    ap.add_argument("--keys", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--distances", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--models", nargs="+", default=["recurrent", "slide"])
    ap.add_argument("--window", default="sliding", choices=["sliding", "block"],
                    help="our model's window (the port's is always block-causal)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--betas", type=float, nargs=2, default=list(BETAS),
                    help="Adam's betas (default: the trainer's %(default)s)")
    ap.add_argument("--out", default="runs/probe-vs-port")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    factories = {"ours": BlockRecurrentTransformer}
    if "port" in args.impl:
        from bench_vs_port import load_port  # beside this script

        factories["port"] = port_factory(load_port(args.port_path))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for impl in args.impl:
        # The port's window is block-causal: its rows' "within reach" marks follow that window.
        base = preset("probe", window="block" if impl == "port" else args.window)
        rows = run_probes(base, kind=args.kind, num_keys=args.keys, distances=args.distances,
                          models=args.models, steps=args.steps, seeds=args.seeds,
                          betas=args.betas,
                          factory=factories[impl],
                          log=lambda s, impl=impl: print(f"[{impl}] {s}", flush=True))
        for r in rows:
            r["impl"] = impl
        name = f"{impl}-{args.kind}-K{'_'.join(map(str, args.keys))}"
        if impl == "ours" and args.window != "sliding":
            name += f"-{args.window}"
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        print(f"\n{impl}:\n{probe_table(rows)}\n", flush=True)


if __name__ == "__main__":
    main()
