"""Passkey retrieval (Mohtashami & Jaggi 2023): exact-match accuracy of a language model asked, at
the end of a document of `length` tokens of filler, for the 5-digit key stated once in it at a
random depth (data/passkey.py makes the documents).

Each document is streamed through the model with `generate.generation.prefill` (chunks of whole
blocks, memories and states carried), so memory stays constant in the length; the answer is then
decoded greedily token by token from the carried memories. Peak memory above the level before
the first document is measured per length (memory.PeakMemory: the resident set's
high-water mark on CPU, max_memory_allocated on CUDA).

    rows = passkey_eval(model, ByteTokenizer(), lengths=(1024, 4096, 16384, 65536), num_docs=20)
    print(passkey_table(rows))
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.passkey import KEY_DIGITS, passkey_prompt, random_key
from ..generate.generation import prefill
from .report import _table

__all__ = ["LENGTHS", "passkey_eval", "passkey_docs", "summarise_passkey", "passkey_table",
           "depth_table", "write_passkey_report"]

LENGTHS = (1024, 4096, 16384, 65536)


def passkey_docs(tokenizer, length: int, num_docs: int, seed: int = 0, depths=None):
    """The `num_docs` prompts of one length: random keys, depths uniform in [0, 1] (or `depths`,
    cycled), seeded by (seed, length) so that every model is asked the same documents."""
    rng = np.random.default_rng([seed, length])
    out = []
    for i in range(num_docs):
        key = random_key(rng)
        depth = float(rng.random()) if depths is None else float(depths[i % len(depths)])
        out.append(passkey_prompt(tokenizer, length, depth, key))
    return out


@torch.inference_mode()
def _answer(model: nn.Module, ids: torch.Tensor, steps: int, chunk_size: int | None):
    """Greedy continuation of a batch of prompts (b, n): (b, steps) token ids."""
    logits, mems, states = prefill(model, ids, chunk_size=chunk_size)
    out = []
    for _ in range(steps):
        tok = logits.argmax(-1)
        out.append(tok)
        logits, mems, states = model(tok[:, None], xl_memories=mems, states=states,
                                     logits_to_keep=1)
        logits = logits[:, -1].float()
    return torch.stack(out, 1)


def _check(lengths, num_docs, batch_size) -> tuple[int, ...]:
    lengths = tuple(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                          for n in lengths):
        raise ValueError(f"lengths must be positive ints (tokens), got {lengths!r}")
    for name, v in (("num_docs", num_docs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return lengths


def _read_and_answer(model, tokenizer, prompts, batches, batch_size: int, length: int,
                     chunk_size) -> list[dict]:
    """Every document read and answered greedily, batch by batch -> one dict per document."""
    docs = []
    for a, ids in zip(range(0, len(prompts), batch_size), batches, strict=True):
        group = prompts[a:a + batch_size]
        steps = max(len(p.answer_ids) for p in group)
        got = _answer(model, ids, steps, chunk_size).tolist()
        for p, g in zip(group, got, strict=True):
            text = tokenizer.decode(g[:len(p.answer_ids)])
            docs.append({"depth": p.depth, "key_position": p.key_position,
                         "distance": length - p.key_position, "key": p.key, "answer": text,
                         "correct": g[:len(p.answer_ids)] == p.answer_ids})
    return docs


def passkey_eval(model: nn.Module, tokenizer, lengths=LENGTHS, num_docs: int = 20, *,
                 seed: int = 0, depths=None, batch_size: int = 20, chunk_size: int | None = 1024,
                 name: str | None = None, progress=None) -> list[dict]:
    """Exact-match passkey accuracy of `model` by document length.

    For each length, `num_docs` prompts of exactly that many tokens (passkey_docs: random keys and
    depths, the same for every model given the same seed) are read in batches of `batch_size`
    rows by prefill (chunks of `chunk_size` tokens, rounded to whole blocks; memory constant in
    the length), then the answer's tokens are decoded greedily; a document counts when the
    decoded answer equals " 71432" (all 5 digits). Returns one row per length: length, accuracy,
    correct, num_docs, peak_memory_bytes (above the level before the length, the documents'
    token ids already built: those are input_bytes; None where it cannot be measured), seconds,
    tokens_per_s, window_reach (tokens a Slide model of this depth and window can see back:
    depth * block_width) and docs (per document: depth,
    key_position, distance from the key to the question's end, key, answer, correct)."""
    from ..memory import PeakMemory

    lengths = _check(lengths, num_docs, batch_size)
    was_training = model.training
    model.eval()
    device = model.token_emb.weight.device
    cfg = model.config
    if chunk_size is not None:
        chunk_size = max(cfg.block_width, chunk_size // cfg.block_width * cfg.block_width)
    meter = PeakMemory(device)
    rows = []
    try:
        with meter.exact():
            for length in lengths:
                prompts = passkey_docs(tokenizer, length, num_docs, seed, depths)
                # the documents' token ids exist before the measurement: peak memory is what
                # reading them costs (their own 8 bytes a token are `input_bytes`)
                batches = [torch.tensor([p.ids for p in prompts[a:a + batch_size]],
                                        dtype=torch.long, device=device)
                           for a in range(0, num_docs, batch_size)]
                meter.start()
                t0 = time.perf_counter()
                docs = _read_and_answer(model, tokenizer, prompts, batches, batch_size, length,
                                        chunk_size)
                seconds = time.perf_counter() - t0
                correct = sum(d["correct"] for d in docs)
                row = {"model": name, "length": length, "accuracy": correct / num_docs,
                       "correct": correct, "num_docs": num_docs, "peak_memory_bytes":
                       meter.peak(), "memory_method": meter.method,
                       "input_bytes": sum(b.numel() * b.element_size() for b in batches),
                       "seconds": seconds,
                       "tokens_per_s": length * num_docs / seconds, "batch_size": batch_size,
                       "chunk_size": chunk_size, "seed": seed,
                       "window_reach": cfg.depth * cfg.block_width,
                       "recurrent": bool(cfg.recurrent_layers), "docs": docs}
                rows.append(row)
                if progress is not None:
                    progress(row)
    finally:
        model.train(was_training)
    return rows


def summarise_passkey(rows: list[dict]) -> dict:
    """{model: {length: accuracy}}."""
    out: dict = {}
    for r in rows:
        out.setdefault(r.get("model"), {})[r["length"]] = r["accuracy"]
    return out


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.1f}"


def passkey_table(rows: list[dict], markdown: bool = True) -> str:
    """One line per model and length: accuracy (correct / documents), peak memory (MiB), tokens/s;
    '(w)' marks lengths whose every key is within the window's reach."""
    header = ["model", "length (tokens)", "exact match", "peak memory (MiB)", "tokens/s"]
    body = []
    for r in rows:
        within = all(d["distance"] <= r["window_reach"] for d in r["docs"])
        body.append([str(r.get("model")), f"{r['length']:,}" + (" (w)" if within else ""),
                     f"{r['accuracy']:.2f} ({r['correct']}/{r['num_docs']})",
                     _mib(r["peak_memory_bytes"]), f"{r['tokens_per_s']:,.0f}"])
    return _table(header, body, markdown)


def depth_table(rows: list[dict], bins: int = 4, markdown: bool = True) -> str:
    """Accuracy by the key's depth (bins of [0, 1]) and length, per model."""
    edges = [i / bins for i in range(bins + 1)]
    header = ["model", "length"] + [f"{edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(bins)]
    body = []
    for r in rows:
        cells = []
        for i in range(bins):
            ds = [d for d in r["docs"] if min(bins - 1, math.floor(d["depth"] * bins)) == i]
            cells.append("-" if not ds else f"{sum(d['correct'] for d in ds)}/{len(ds)}")
        body.append([str(r.get("model")), f"{r['length']:,}"] + cells)
    return _table(header, body, markdown)


def write_passkey_report(rows: list[dict], out_dir, title: str = "passkey retrieval") -> dict:
    """out_dir/passkey.json (every row and document) and passkey.md (the tables)."""
    from ..files import write_atomic, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "passkey.json", rows)
    text = (f"# {title}\n\nExact match of all {KEY_DIGITS} digits, greedy; chance ~0. '(w)': "
            f"every key within the window's reach (depth x W tokens).\n\n{passkey_table(rows)}\n"
            f"\n## By the key's depth\n\n{depth_table(rows)}\n")
    write_atomic(out / "passkey.md", lambda f: f.write(text.encode()))
    return {"json": str(out / "passkey.json"), "md": str(out / "passkey.md")}
