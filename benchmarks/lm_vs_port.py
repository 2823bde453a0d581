"""Language-modelling quality of our model and the best-known PyTorch port at equal settings:
the same corpus, tokenizer, model sizes, batches, optimizer, schedule and steps, trained and
evaluated side by side in one process, recurrent and not.

    pip install --no-deps --target /tmp/portlib block-recurrent-transformer-pytorch==0.4.4 \\
        einops beartype
    python benchmarks/lm_vs_port.py --port-path /tmp/portlib --steps 400

Data: the built-in corpus (the Python standard library's sources), byte-level, split by
document as `brt train` splits it. Training reads document lanes (`DocumentLanes`: each batch
row continues its document, memories and states carried across segments, detached). Our model
resets a row's state at a document start; the port cannot (it has no per-row reset), so its
state and cache run on into the next document of the lane, as they do for its own users.
Evaluation streams the held-out test documents the same way and reports bits per byte (the
byte tokenizer: one token per byte, plus a document-start token that is never a target).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blockrecurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from blockrecurrent.data.corpus import (
    ByteTokenizer,
    DocumentLanes,
    load_documents,
    split_documents,
    tokenize_corpus,
)


def build(impl: str, config: BlockRecurrentConfig, port_cls, frozen: bool = False):
    if impl == "ours":
        model = BlockRecurrentTransformer(config)
        for cell in model.recurrent_cells if frozen else ():
            cell.update = lambda state, *args: state  # the state never leaves its initial value
        return model
    return port_cls(num_tokens=config.num_tokens, dim=config.dim, depth=config.depth,
                    dim_head=config.dim_head, heads=config.heads,
                    max_seq_len=config.max_seq_len, block_width=config.block_width,
                    num_state_vectors=config.num_state_vectors,
                    recurrent_layers=tuple(config.recurrent_layers))


def step(model, impl: str, batch, mems, states):
    """Summed masked cross-entropy (nats) of one segment, its token count, the next carry."""
    if impl == "ours":
        logits, mems, states = model(batch["inputs"], xl_memories=mems, states=states,
                                     reset=batch["reset"])
    else:  # the port returns memories and states only for full-length segments (all are)
        logits, mems, states = model(batch["inputs"], xl_memories=mems or [],
                                     states=states or [])
    mask = batch["loss_mask"]
    nll = F.cross_entropy(logits[mask], batch["targets"][mask], reduction="sum")
    return nll, int(mask.sum()), mems, states


def train(model, impl, corpus, args) -> dict:
    lanes = DocumentLanes(corpus, args.batch_size, args.segment, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps))))
    model.train()
    mems = states = None
    losses, tokens, t0 = [], 0, time.perf_counter()
    for _ in range(args.steps):
        batch = lanes.next_batch()
        nll, n, mems, states = step(model, impl, batch, mems, states)
        loss = nll / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        tokens += batch["inputs"].numel()
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    return dict(train_loss_last10pct=sum(tail) / len(tail), train_tokens_per_s=tokens / seconds,
                train_seconds=seconds)


@torch.no_grad()
def evaluate(model, impl, corpus, args) -> dict:
    lanes = DocumentLanes(corpus, args.batch_size, args.segment, shuffle=False, loop=False)
    model.eval()
    mems = states = None
    total_nll, total_n, segments = 0.0, 0, 0
    while not lanes.exhausted and (args.eval_segments is None or segments < args.eval_segments):
        batch = lanes.next_batch()
        nll, n, mems, states = step(model, impl, batch, mems, states)
        total_nll, total_n, segments = total_nll + nll.item(), total_n + n, segments + 1
    return dict(test_bits_per_byte=total_nll / max(total_n, 1) / math.log(2), test_tokens=total_n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port-path", help="folder holding block_recurrent_transformer_pytorch")
    ap.add_argument("--impl", nargs="+", default=["ours", "port"], choices=["ours", "port"])
    ap.add_argument("--models", nargs="+", default=["recurrent", "slide"],
                    choices=["recurrent", "slide", "frozen"],
                    help="frozen (ours only): the recurrent model with a state that never moves "
                         "(tokens read the learned initial state), to separate the cost of the "
                         "recurrent layer from that of the state's motion")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--segment", type=int, default=256, help="tokens per training segment")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim-head", type=int, default=32)
    ap.add_argument("--block-width", type=int, default=64)
    ap.add_argument("--recurrent-layer", type=int, default=3)
    ap.add_argument("--window", nargs="+", default=["sliding"], choices=["sliding", "block"],
                    help="our model's window(s); the port's is always block-causal")
    ap.add_argument("--mlp", nargs="+", default=["geglu"], choices=["geglu", "gelu"],
                    help="our model's MLP(s); the port's is always GEGLU")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--eval-segments", type=int, default=200,
                    help="test segments of batch-size rows to score (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/lm-vs-port")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    port_cls = None
    if "port" in args.impl:
        from bench_vs_port import load_port  # beside this script

        port_cls = load_port(args.port_path)

    tok = ByteTokenizer()
    splits = split_documents(load_documents("stdlib"))
    train_c, test_c = (tokenize_corpus(splits[s], tok) for s in ("train", "test"))
    rows = []
    runs = [(impl, window, mlp) for impl in args.impl
            for window in (args.window if impl == "ours" else ["block"])
            for mlp in (args.mlp if impl == "ours" else ["geglu"])]
    for kind in args.models:
        for impl, window, mlp in runs:
            if kind == "frozen" and impl != "ours":
                continue
            config = BlockRecurrentConfig(
                num_tokens=tok.vocab_size, dim=args.dim, depth=args.depth, heads=args.heads,
                dim_head=args.dim_head, max_seq_len=args.segment, block_width=args.block_width,
                num_state_vectors=args.block_width, window=window, mlp=mlp,
                recurrent_layers=() if kind == "slide" else (args.recurrent_layer,))
            torch.manual_seed(args.seed)
            model = build(impl, config, port_cls, frozen=kind == "frozen")
            row = dict(impl=impl, model=kind, window=window, mlp=mlp, steps=args.steps,
                       params=sum(p.numel() for p in model.parameters()))
            row.update(train(model, impl, train_c, args))
            row.update(evaluate(model, impl, test_c, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_vs_port.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    print("\n| impl | model | window | MLP | params | test bits/byte | train tokens/s |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['model']} | {r['window']} | {r['mlp']} | {r['params']:,} "
              f"| {r['test_bits_per_byte']:.3f} "
              f"| {r['train_tokens_per_s']:,.0f} |")
    return dict(rows=rows)


if __name__ == "__main__":
    main()
