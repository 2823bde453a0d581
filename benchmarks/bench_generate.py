"""Generation speed: prefill and cached decoding at several context lengths, against the naive
path that re-runs a full forward over the last max_seq_len tokens for every new token (how the
best-known PyTorch port generates: no cache).

    python benchmarks/bench_generate.py --preset small --contexts 1024 16384 65536 --new-tokens 64

On a shared machine add --threads 1: extra threads then fight other processes for the cores,
and the per-CPU-second table (exact with one thread) shows the work done despite the load.

Random weights (speed does not depend on them). Greedy decoding, batch 1 by default. What a
working cache shows: decode tokens/s at 64k within about 10% of those at 1k (a step's cost does
not grow with the context); prefill tokens/s and peak memory flat in prompt length (linear
time); cached decoding many times (>= 20x at these lengths) faster than the naive path.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from blockrecurrent import (
    PRESETS,
    BlockRecurrentConfig,
    BlockRecurrentTransformer,
    preset,
)
from blockrecurrent.bench.decode import decode_speed, format_decode
from blockrecurrent.bench.run import REFERENCE_CONFIG
from blockrecurrent.generate.generation import generate
from blockrecurrent.memory import PeakMemory


def timed(fn):
    """(result, wall seconds, process CPU seconds). With one thread, CPU time is the work done,
    robust to other processes stealing the core; with more threads it sums over them."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


@torch.inference_mode()
def naive_generate(model, window, new_tokens: int) -> tuple[list[float], list[float]]:
    """Greedy decoding by a fresh forward over the last max_seq_len tokens for every token, no
    memories or states carried. Returns the wall and CPU seconds of each token."""
    n, wall, cpu = model.config.max_seq_len, [], []
    window = window[:, -n:]
    for _ in range(new_tokens):
        (logits, _, _), w, c = timed(functools.partial(model, window))
        window = torch.cat([window[:, 1:], logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        wall.append(w)
        cpu.append(c)
    return wall, cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--reference", action="store_true",
                    help="the reference config (blockrecurrent.bench.run.REFERENCE_CONFIG: "
                         "dim 256, depth 4, 4x64 heads, W = S = 128, max_seq_len 1024) instead "
                         "of --preset")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32],
                    help="batch sizes of the decoding table (after a prompt of the first "
                         "context); none to skip it")
    ap.add_argument("--compile", action="store_true",
                    help="also time the compiled decoding step (model.compile_decode())")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384, 65536],
                    help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per round")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds (medians reported); each round decodes after every context and "
                         "runs the naive baseline, interleaved so load changes hit all alike. "
                         "Prefill is repeated as often for contexts up to 8192 tokens")
    ap.add_argument("--naive-tokens", type=int, default=4,
                    help="tokens of the naive baseline per round")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 avoids oversubscription on "
                         "a shared machine and makes the CPU-time columns exact)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if min(args.contexts) < 1 or args.new_tokens < 1 or args.repeats < 1 or args.naive_tokens < 1 \
            or args.batch < 1:
        ap.error("--contexts, --new-tokens, --repeats, --naive-tokens and --batch must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = BlockRecurrentConfig(**REFERENCE_CONFIG) if args.reference else preset(args.preset)
    name = "reference" if args.reference else args.preset
    model = BlockRecurrentTransformer(config).eval()
    print(f"{name}: {model.num_params() / 1e6:.2f}M non-embedding parameters, "
          f"W={config.block_width}, max_seq_len={config.max_seq_len}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    longest = torch.randint(0, config.num_tokens, (args.batch, max(args.contexts)), generator=gen)
    generate(model, longest[:, :config.max_seq_len], 4, do_sample=False)  # warm up

    # Prefill memory first, in untimed passes (see blockrecurrent.bench.run: live data, measured
    # before any timed work): the peak above the memory before the call.
    meter, prefill_mib = PeakMemory(torch.device("cpu")), {}
    with meter.exact():
        for n in args.contexts:
            peak = meter.measure(functools.partial(generate, model, longest[:, :n], 0,
                                                   return_state=True))
            prefill_mib[n] = None if peak is None else peak / 2 ** 20

    # Prefill: generate with 0 new tokens reads the prompt and keeps the state to decode from.
    rows, start = [], {}
    for n in args.contexts:
        wall, cpu = [], []
        for _ in range(args.repeats if n <= 8192 else 1):
            start[n], w, c = timed(functools.partial(generate, model, longest[:, :n], 0,
                                                     return_state=True))
            wall.append(w)
            cpu.append(c)
        rows.append(dict(context=n, prefill_seconds=statistics.median(wall),
                         prefill_cpu_seconds=statistics.median(cpu), decode_wall=[],
                         decode_cpu=[], legacy_wall=[], legacy_cpu=[],
                         prefill_peak_mib=prefill_mib[n]))
        print(f"  prefill {n} tokens: {rows[-1]['prefill_seconds']:.2f} s", flush=True)

    # Decoding, interleaved with the naive baseline. return_state=True makes exactly one model
    # call per token (the last one is read too), each from the same prefilled state.
    naive_wall, naive_cpu = [], []
    for _ in range(args.repeats):
        for r in rows:
            for fast, key in ((True, "decode"), (False, "legacy")):  # legacy: the general path
                model.fast_decode = fast
                _, w, c = timed(functools.partial(generate, model, None, args.new_tokens,
                                                  do_sample=False, past=start[r["context"]],
                                                  return_state=True))
                r[key + "_wall"].append(w / args.new_tokens)
                r[key + "_cpu"].append(c / args.new_tokens)
            model.fast_decode = True
        w, c = naive_generate(model, longest, args.naive_tokens)
        naive_wall += w
        naive_cpu += c
    naive = dict(wall=args.batch / statistics.median(naive_wall),
                 cpu=args.batch / statistics.median(naive_cpu))

    b, base = args.batch, rows[0]
    for r in rows:
        r["prefill_tokens_per_s"] = b * r["context"] / r["prefill_seconds"]
        r["prefill_tokens_per_cpu_s"] = b * r["context"] / r["prefill_cpu_seconds"]
        r["decode_tokens_per_s"] = b / statistics.median(r["decode_wall"])
        r["decode_tokens_per_cpu_s"] = b / statistics.median(r["decode_cpu"])
        r["legacy_tokens_per_s"] = b / statistics.median(r["legacy_wall"])
        r["legacy_tokens_per_cpu_s"] = b / statistics.median(r["legacy_cpu"])
        r["fast_over_legacy"] = statistics.median(
            lw / fw for fw, lw in zip(r["decode_wall"], r["legacy_wall"], strict=True))
    for r in rows:
        r["prefill_vs_first"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        r["decode_vs_first"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["cached_over_naive"] = r["decode_tokens_per_s"] / naive["wall"]
        r["prefill_cpu_vs_first"] = (r["prefill_tokens_per_cpu_s"]
                                     / base["prefill_tokens_per_cpu_s"])
        r["decode_cpu_vs_first"] = r["decode_tokens_per_cpu_s"] / base["decode_tokens_per_cpu_s"]
        r["cached_over_naive_cpu"] = r["decode_tokens_per_cpu_s"] / naive["cpu"]

    for clock, sfx, nv in (("wall clock", "", naive["wall"]),
                           ("per CPU-second", "_cpu", naive["cpu"])):
        per = "_per_cpu_s" if sfx else "_per_s"
        print(f"\ntokens/s, {clock}: medians; 'x first' relative to the first context; decode and "
              f"naive from {args.repeats} interleaved rounds")
        print(f"{'context':>8} | {'prefill':>8} | {'x first':>7} | {'decode':>7} | "
              f"{'x first':>7} | {'cached/naive':>12} | {'legacy':>7} | {'fast/legacy':>11}")
        print("-" * 96)
        for r in rows:
            print(f"{r['context']:>8} | {r['prefill_tokens' + per]:>8,.0f} | "
                  f"{r['prefill' + sfx + '_vs_first']:>7.2f} | "
                  f"{r['decode_tokens' + per]:>7.1f} | {r['decode' + sfx + '_vs_first']:>7.2f} | "
                  f"{r['cached_over_naive' + sfx]:>11.1f}x | {r['legacy_tokens' + per]:>7.1f} | "
                  f"{r['fast_over_legacy']:>10.2f}x")
        print(f"naive (a full forward over the last {config.max_seq_len} tokens per token): "
              f"{nv:.2f} tokens/s ({len(naive_wall)} tokens)")
    print("\nprefill peak memory above the start, MiB (" + meter.method + "): " + ", ".join(
        f"{r['context']}: " + ("-" if r["prefill_peak_mib"] is None else
                               f"{r['prefill_peak_mib']:.1f}") for r in rows))

    batch_rows = None
    if args.batches:
        batch_rows = decode_speed(
            model, batches=args.batches, prompt_len=min(args.contexts), new_tokens=args.new_tokens,
            repeats=args.repeats,
            paths=("fast", "legacy") + (("compiled",) if args.compile else ()),
            seed=args.seed, log=lambda *a: print(*a, flush=True))
        print(format_decode(batch_rows))

    result = dict(preset=name, decode_batches=batch_rows, config=config.to_dict(), batch=args.batch,
                  threads=torch.get_num_threads(), new_tokens=args.new_tokens,
                  repeats=args.repeats, torch=torch.__version__, rows=rows,
                  naive_tokens_per_s=naive["wall"], naive_tokens_per_cpu_s=naive["cpu"],
                  naive_seconds=naive_wall, naive_cpu_seconds=naive_cpu)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
