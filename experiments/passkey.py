"""Passkey retrieval in a trained language model: a recurrent model and Slide (the same window,
no recurrent layer) trained on the standard library with passkey documents mixed in, then asked
for the key at 1k, 4k, 16k and 64k tokens (evaluate/passkey.py; results in docs/passkey.md).

    python experiments/passkey.py --out runs/passkey            # build data, train both, evaluate
    python experiments/passkey.py --out runs/passkey --eval-only  # evaluate the trained models

The training corpus is a folder (`data=FOLDER`, no library change): a seeded share of the stdlib's
files copied as text, plus passkey documents (data/passkey.py) of random length, key and depth,
as many as make `--passkey-share` of the characters. The model is configs/small.toml's (dim 256,
4 layers, W = S = 64, layer 3 recurrent) with longer training segments (`--segment`, so that
the answer's gradient reaches the key through the state across several blocks) and, optionally,
longer gate timescales (`--gate-max-blocks`: the fixed gate's chrono initialisation spread over
2..N blocks instead of 2..64; done here by patching the initialiser, see the report for the
config field this proposes).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from blockrecurrent.data.corpus import iter_stdlib
from blockrecurrent.data.passkey import write_passkey_documents
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.evaluate.passkey import LENGTHS, passkey_eval, write_passkey_report
from blockrecurrent.model import cell as cell_module
from blockrecurrent.model import transformer as transformer_module
from blockrecurrent.model.config import preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer
from blockrecurrent.train.settings import TrainConfig
from blockrecurrent.train.trainer import train


def build_corpus(folder: Path, stdlib_share: float, passkey_share: float, min_chars: int,
                 max_chars: int, seed: int) -> dict:
    """folder/stdlib/<path>.txt: a seeded `stdlib_share` of the stdlib's files; folder/passkey/:
    passkey documents making `passkey_share` of all characters."""
    if folder.exists():
        shutil.rmtree(folder)
    rng = np.random.default_rng(seed)
    chars = 0
    files = 0
    for doc in iter_stdlib():
        if rng.random() < stdlib_share:
            path = folder / "stdlib" / (doc.name + ".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(doc.text)
            chars += len(doc.text)
            files += 1
    mean = (min_chars + max_chars) / 2
    count = max(1, int(chars * passkey_share / (1 - passkey_share) / mean))
    write_passkey_documents(folder / "passkey", count, min_chars, max_chars, seed=seed)
    return {"stdlib_files": files, "stdlib_chars": chars, "passkey_docs": count,
            "passkey_chars_mean": mean}


def model_config(args, recurrent: bool):
    return preset("small", dim=args.dim, dim_head=args.dim // 4, max_seq_len=args.segment,
                  block_width=64, num_state_vectors=64,
                  recurrent_layers=(3,) if recurrent else ())


def train_one(args, name: str, recurrent: bool, data: Path) -> dict:
    out = args.out / name
    cfg = TrainConfig(data=str(data), tokenizer="byte", out_dir=str(out), batch_size=args.lanes,
                      max_steps=args.steps, lr=args.lr, min_lr=args.lr / 10,
                      warmup_steps=args.warmup, seed=args.seed, eval_interval=0,
                      eval_tokens=16384, log_interval=10, save_interval=0, keep_last=1,
                      cache_dir=str(args.out / "data_cache"))
    original = transformer_module.retention_bias
    if args.gate_max_blocks:
        transformer_module.retention_bias = functools.partial(cell_module.retention_bias,
                                                              max_blocks=args.gate_max_blocks)
    t0 = time.perf_counter()
    try:
        summary = train(model_config(args, recurrent), cfg)
    finally:
        transformer_module.retention_bias = original
    summary["wall_s"] = time.perf_counter() - t0
    return summary


@torch.no_grad()
def digit_losses(model, key: str = "71432", num_chars: int = 400, depth: float = 0.9) -> dict:
    """Loss (nats) on each digit of a training-style document's three keys: the first statement
    (nothing predicts it), its repetition in "Remember it. 71432 is the pass key." (a copy ~24
    tokens back) and the answer. ln 10 = 2.30 everywhere: the model does not copy."""
    from blockrecurrent.data.passkey import passkey_text

    tok = ByteTokenizer()
    text = passkey_text(num_chars, depth, key)
    ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
    logits = model.eval()(ids)[0][0, :-1].float()
    nll = -torch.log_softmax(logits, -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    out, start = {}, 0
    for name in ("stated", "repeated", "answer"):
        i = text.index(key, start)
        start = i + 1
        out[name] = [round(float(nll[i + k]), 2) for k in range(len(key))]  # char i = token i+1
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/passkey"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lanes", type=int, default=8)
    p.add_argument("--dim", type=int, default=256, help="model width (4 heads of dim / 4)")
    p.add_argument("--segment", type=int, default=512, help="training segment (tokens)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-max-blocks", type=float, default=0,
                   help="fixed gate biases spread over 2..N blocks (0: the library's 64)")
    p.add_argument("--stdlib-share", type=float, default=0.25)
    p.add_argument("--passkey-share", type=float, default=0.5)
    p.add_argument("--min-chars", type=int, default=300)
    p.add_argument("--max-chars", type=int, default=1536)
    p.add_argument("--models", nargs="+", default=["recurrent", "slide"])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--docs", type=int, nargs="+", default=[20, 20, 8, 4],
                   help="documents per length (one value, or one per length)")
    p.add_argument("--eval-batch", type=int, default=4,
                   help="documents read at once (the same at every length: comparable memory)")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    previous = args.out / "experiment.json"  # an --eval-only run keeps the training records
    log = json.loads(previous.read_text()) if previous.exists() else {}
    log["args" if not args.eval_only else "eval_args"] = {k: str(v) for k, v in vars(args).items()}
    if not args.eval_only:
        log["corpus"] = build_corpus(data, args.stdlib_share, args.passkey_share,
                                     args.min_chars, args.max_chars, args.seed)
        print(json.dumps(log["corpus"]), flush=True)
    docs = args.docs if len(args.docs) > 1 else args.docs * len(args.lengths)
    saved = args.out / "passkey.json"  # rows of the models not run this time are kept
    rows = [r for r in (json.loads(saved.read_text()) if saved.exists() else [])
            if r.get("model") not in args.models]
    for name in args.models:  # train, then evaluate, one model at a time
        if not args.eval_only:
            s = train_one(args, name, name == "recurrent", data)
            log[name] = s
            print(name, json.dumps({k: s[k] for k in ("step", "train_loss", "val_bpb",
                                                      "wall_s")}), flush=True)
        model = BlockRecurrentTransformer.from_pretrained(args.out / name / "model")
        log.setdefault("digit_losses", {})[name] = digit_losses(model)
        print(name, "digit losses (nats):", log["digit_losses"][name], flush=True)
        for length, n in zip(args.lengths, docs, strict=True):
            rows += passkey_eval(model, ByteTokenizer(), (length,), n, seed=args.seed,
                                 batch_size=args.eval_batch, name=name,
                                 progress=lambda r: print(
                                     f"{r['model']} {r['length']}: {r['accuracy']:.2f} "
                                     f"({r['correct']}/{r['num_docs']}), peak "
                                     f"{(r['peak_memory_bytes'] or 0) / 2**20:.1f} MiB, "
                                     f"{r['seconds']:.0f} s", flush=True))
            write_passkey_report(rows, args.out, title="passkey retrieval")
        (args.out / "experiment.json").write_text(json.dumps(log, indent=2, default=str))
    print((args.out / "passkey.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
