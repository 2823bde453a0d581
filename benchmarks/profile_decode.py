"""Where a decoding step's time goes: torch.profiler over greedy steps of the fast (default),
legacy (general path) and optionally compiled step, grouped into matrix products, attention,
other operators and the rest (Python, dispatch, the generation loop), beside the best time to
read the step's weights once (blockrecurrent.bench.decode.read_seconds) measured in the same run.

    python benchmarks/profile_decode.py --threads 1 [--batch 1] [--compile]

The reference config (blockrecurrent.bench.run.REFERENCE_CONFIG), random weights, a
16-token prompt. Profiler overhead inflates the small operators a little; compare paths within
one run (paths alternate over --rounds rounds; medians).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile

from blockrecurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from blockrecurrent.bench.decode import decode_bytes, read_seconds
from blockrecurrent.bench.run import REFERENCE_CONFIG
from blockrecurrent.generate.generation import generate

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_attention_math", "aten::softmax",
                        "aten::_softmax")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(BlockRecurrentConfig(**REFERENCE_CONFIG)).eval()
    p = torch.randint(0, 256, (args.batch, 16))
    start = generate(model, p, 0, return_state=True)
    paths = ["fast", "legacy"] + (["compiled"] if args.compile else [])
    compiled = None
    if args.compile:
        model.compile_decode()
        generate(model, None, 4, do_sample=False, past=start)
        compiled = model._compiled_decode
        model.compile_decode(False)
    nbytes = decode_bytes(model, args.batch, 16 + args.steps // 2)["weights"]
    print(f"batch {args.batch}, {torch.get_num_threads()} threads; weights the step reads: "
          f"{nbytes / 2 ** 20:.1f} MiB, best read time "
          f"{1e3 * read_seconds(nbytes, torch.device('cpu')):.2f} ms")
    print(f"{'path':>9} | {'step ms':>7} | {'matmul':>6} | {'attention':>9} | {'other ops':>9} | "
          f"{'rest':>6} | ops/step")
    table = {path: [] for path in paths}
    for _ in range(args.rounds):  # paths alternate, so a change in machine load hits all alike
        for path in paths:
            model.fast_decode = path != "legacy"
            model._compiled_decode = compiled if path == "compiled" else None
            generate(model, None, 8, do_sample=False, past=start)
            with profile() as prof:
                t0 = time.perf_counter()
                generate(model, None, args.steps, do_sample=False, past=start)
                wall = (time.perf_counter() - t0) / args.steps
            sums = dict.fromkeys(GROUPS, 0.0)
            other, calls = 0.0, 0
            for ev in prof.key_averages():
                if not ev.key.startswith("aten::"):
                    continue
                us = ev.self_cpu_time_total / args.steps
                group = next((g for g, names in GROUPS.items() if ev.key in names), None)
                if group:
                    sums[group] += us
                else:
                    other += us
                calls += ev.count
            rest = 1e6 * wall - sum(sums.values()) - other
            table[path].append((1e3 * wall, sums["matmul"] / 1e3, sums["attention"] / 1e3,
                                other / 1e3, rest / 1e3, calls / args.steps))
    model.fast_decode, model._compiled_decode = True, None
    for path, rounds in table.items():
        step_ms, mm, att, oth, rest, ops = (statistics.median(c) for c in zip(*rounds, strict=True))
        print(f"{path:>9} | {step_ms:>7.2f} | {mm:>6.2f} | {att:>9.2f} | {oth:>9.2f} | "
              f"{rest:>6.2f} | {ops:.0f}")
    print("(ms per step; 'rest' = wall time not inside an aten operator: Python, dispatch, "
          "the generation loop, the compiled graph's own kernels)")


if __name__ == "__main__":
    main()
