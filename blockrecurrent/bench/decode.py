"""Decoding benchmark: greedy tokens/s of the cached single-token step at several batch sizes
for the fast, legacy and compiled paths, against the memory-read bound measured in the same run.

    python -m blockrecurrent.bench --decode --decode-batches 1 8 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..model.config import BlockRecurrentConfig
from ..model.transformer import BlockRecurrentTransformer
from .machine import cpu_name, cpu_seconds, fmt, sync

# --------------------------------------------------------------------------- decoding

DECODE_PATHS = ("fast", "legacy", "compiled")


def decode_bytes(model: BlockRecurrentTransformer, batch: int, cache_len: int) -> dict:
    """Bytes one decoding step must read: every weight it multiplies by (once per step,
    whatever the batch), and per row the cached keys/values its window reads (up to W per
    layer with the sliding window, the whole cache with "block") and the state keys/values."""
    from ..model.attention import WindowPlan

    cfg = model.config
    weights = sum(w.numel() * w.element_size() for w in step_weights(model))
    size = model.token_emb.weight.element_size()
    read = cache_len + 1 - WindowPlan.step_start(cfg, cache_len)  # keys the step reads
    per_row = size * (2 * cfg.depth * read * cfg.inner_dim
                      + 2 * len(cfg.recurrent_layers) * cfg.num_state_vectors * cfg.inner_dim)
    return {"weights": weights, "cache_per_row": per_row, "total": weights + batch * per_row}


def step_weights(model: BlockRecurrentTransformer) -> list:
    """The weights a decoding step multiplies by (the embedding is only indexed, and the state's
    projections run once per block, not per token)."""
    out = [model.norm.weight, model.norm.bias, model.to_logits.weight]
    for layer in model.layers:
        a = layer.attn
        out += [layer.attn_norm.weight, layer.attn_norm.bias, layer.mlp_norm.weight,
                layer.mlp_norm.bias, layer.mlp[0].weight, layer.mlp[2].weight]
        out += ([a.token_proj.weight, a.scales, a.token_out.weight] if layer.recurrent
                else [a.qkv.weight, a.out.weight])
    return out


def read_seconds(nbytes: int, device: torch.device, repeats: int = 30) -> float:
    """Best time to read nbytes once here (a sum over an fp32 buffer of that size, warm): the
    floor of any step that reads that much memory (on CPU a ~15 MB model sits in the last-level
    cache after the first step, as the weights do when decoding)."""
    buf = torch.randn(max(1, nbytes // 4), device=device)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def decode_speed(model: BlockRecurrentTransformer, *, batches=(1, 8, 32), prompt_len: int = 16,
                 new_tokens: int = 64, repeats: int = 5, paths=("fast", "legacy"),
                 seed: int = 0, log=lambda *a: None) -> list[dict]:
    """Greedy decoding tokens/s (batch * steps / s) after a prompt of prompt_len tokens, at each
    batch size, for each path: "fast" (model.step, the default), "legacy" (the
    general path, model.fast_decode = False) and "compiled" (model.compile_decode()). Paths
    alternate within every repeat; medians over repeats, plus per-step wall and CPU seconds
    and the read bound (decode_bytes / read_seconds, measured here) for each batch."""
    from ..generate.generation import generate

    bad = [p for p in paths if p not in DECODE_PATHS]
    if bad:
        raise ValueError(f"unknown decode paths {bad}: choose from {DECODE_PATHS}")
    device = model.token_emb.weight.device
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    rows = []
    model.eval()
    for b in batches:
        p = torch.randint(0, cfg.num_tokens, (b, prompt_len), generator=gen).to(device)
        start = generate(model, p, 0, return_state=True)
        compiled = None
        if "compiled" in paths:
            model.compile_decode()
            t0 = time.perf_counter()
            generate(model, None, 4, do_sample=False, past=start)  # compiles for this batch
            compiled, compile_s = model._compiled_decode, time.perf_counter() - t0
            log(f"[decode] batch {b}: compiled in {compile_s:.0f} s")
            model.compile_decode(False)
        wall, cpu = _timed_paths(model, start, compiled, paths, new_tokens, repeats)
        mid_cache = start.xl_memories.cache_len + new_tokens // 2  # about, over the steps
        nbytes = decode_bytes(model, b, min(mid_cache, 2 * cfg.block_width - 2))
        t_w = read_seconds(nbytes["weights"], device)
        t_all = read_seconds(nbytes["total"], device)
        row = dict(batch=b, prompt_len=prompt_len, new_tokens=new_tokens, bytes=nbytes,
                   weights_read_s=t_w, all_read_s=t_all,
                   weights_bound_tokens_per_s=b / t_w, read_bound_tokens_per_s=b / t_all)
        for path in paths:
            row[path] = dict(tokens_per_s=b / statistics.median(wall[path]),
                             tokens_per_cpu_s=b / statistics.median(cpu[path]),
                             step_ms=1e3 * statistics.median(wall[path]))
        if "legacy" in paths and "fast" in paths:
            row["fast_over_legacy"] = statistics.median(
                leg / f for f, leg in zip(wall["fast"], wall["legacy"], strict=True))
        if "compiled" in paths:
            row["compile_seconds"] = compile_s
            row["compiled_over_fast"] = statistics.median(
                f / c for f, c in zip(wall["fast"], wall["compiled"], strict=True)
            ) if "fast" in paths else None
        rows.append(row)
        log(f"[decode] batch {b}: " + ", ".join(
            f"{k} {row[k]['tokens_per_s']:,.0f} tok/s" for k in paths)
            + f"; weights read {1e3 * t_w:.2f} ms, +cache {1e3 * t_all:.2f} ms")
    return rows


def _timed_paths(model, start, compiled, paths, new_tokens: int, repeats: int
                 ) -> tuple[dict, dict]:
    """Wall and CPU seconds per step of each path, the paths alternating within every repeat."""
    from ..generate.generation import generate

    wall = {k: [] for k in paths}
    cpu = {k: [] for k in paths}
    for _ in range(repeats):
        for path in paths:
            model.fast_decode = path != "legacy"
            model._compiled_decode = compiled if path == "compiled" else None
            c0, t0 = cpu_seconds(), time.perf_counter()
            generate(model, None, new_tokens, do_sample=False, past=start, return_state=True)
            wall[path].append((time.perf_counter() - t0) / new_tokens)
            cpu[path].append((cpu_seconds() - c0) / new_tokens)
        model.fast_decode, model._compiled_decode = True, None
    return wall, cpu


def format_decode(rows: list[dict]) -> str:
    paths = [p for p in DECODE_PATHS if p in rows[0]]
    lines = ["", f"### Decoding (greedy, prompt {rows[0]['prompt_len']} tokens, "
                 f"{rows[0]['new_tokens']} steps, medians)", "",
             "| batch | " + " | ".join(f"{p} tokens/s" for p in paths) +
             " | fast / legacy | weights-read bound | weights+cache bound | fast step |",
             "|---:|" + "---:|" * len(paths) + "---:|---:|---:|---:|"]
    for r in rows:
        ratio = r.get("fast_over_legacy")
        lines.append(f"| {r['batch']} | " + " | ".join(
            f"{r[p]['tokens_per_s']:,.0f}" for p in paths) +
            f" | {fmt(ratio, '.2f')}x | {r['weights_bound_tokens_per_s']:,.0f} "
            f"({1e3 * r['weights_read_s']:.2f} ms) | {r['read_bound_tokens_per_s']:,.0f} | "
            f"{r['fast']['step_ms'] if 'fast' in r else float('nan'):.2f} ms |")
    first = rows[0]
    if "fast" in first:
        for r in rows[1:]:
            lines.append(f"\nbatch {r['batch']} / batch {first['batch']} tokens/s (fast): "
                         f"{r['fast']['tokens_per_s'] / first['fast']['tokens_per_s']:.1f}x")
    lines.append("\nBounds: batch / (best time to read that many bytes here: the weights the "
                 "step multiplies by, plus each row's cached keys/values and state keys/values), "
                 "measured in the same run.")
    return "\n".join(lines)


def run_decode(args: argparse.Namespace, config: BlockRecurrentConfig) -> dict:
    """`--decode`: decoding tokens/s of one model (random weights) at several batch sizes."""
    if min(args.decode_batches) < 1 or args.prompt_len < 1 or args.new_tokens < 1:
        raise ValueError("--decode-batches, --prompt-len and --new-tokens must be >= 1")
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(config).to(args.device).eval()
    paths = ("fast", "legacy") + (("compiled",) if args.compile else ())
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    log(f"[decode] {model.num_params() / 1e6:.2f}M non-embedding parameters, "
        f"{torch.get_num_threads()} threads, {cpu_name() if args.device == 'cpu' else args.device}")
    rows = decode_speed(model, batches=args.decode_batches, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, repeats=args.repeats or 5, paths=paths,
                        log=log)
    md = format_decode(rows)
    print(md, flush=True)
    res = dict(config=config.to_dict(), threads=torch.get_num_threads(), torch=torch.__version__,
               device=str(args.device), decode=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.md:
        Path(args.md).write_text(md + "\n")
    return res
