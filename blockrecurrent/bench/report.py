"""The benchmark's results as tables: the vocabulary of a results dict (modes, dtypes, models,
in table order), the markdown of a run with its linear-cost and step-time marks, the reference
comparison against the port's figures and the targets, and the JSON / markdown files."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from .machine import fmt

DTYPES = ("fp32", "bf16")
MODES = ("train", "infer")
MODELS = ("recurrent", "slide", "xl")

# The figures of the best-known PyTorch port (block-recurrent-transformer-pytorch 0.4.4) on
# issue 5's reference configuration (bench.REFERENCE_CONFIG), batch 4, stream of 2048 tokens.
PORT_TOKENS_PER_S = {("train", "fp32"): 5_500, ("train", "bf16"): 8_700,
                     ("infer", "fp32"): 18_000, ("infer", "bf16"): 33_000}
TARGET_TOKENS_PER_S = {"train": 13_000, "infer": 50_000}
TARGET_LINEAR = 0.10  # tokens/s at the largest length within 10% of the smallest
TARGET_REC_OVER_SLIDE = 1.15  # recurrent step time at most 15% above Slide's


def _linear_mark(s: dict, x) -> str:
    """A summary ratio against the linear-cost target."""
    if s["smallest"] == s["largest"]:  # one length: nothing to compare
        return "-"
    return f"{x:.3f} " + ("ok" if abs(x - 1) <= TARGET_LINEAR else "MISS")


def _vs_slide_mark(s: dict, x) -> str:
    """A step-time ratio to Slide, against the target for the recurrent model."""
    if x is None:
        return "-"
    ok = " ok" if x <= TARGET_REC_OVER_SLIDE else " MISS"
    return f"{x:.3f}" + (ok if s["model"] == "recurrent" else "")


def format_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"### Benchmark: torch {m['torch']}, {m['device']} ({m['processor']}), "
             f"{m['threads']} threads, compile={m['compile']}, median of {m['repeats']}",
             "",
             "Matmul peak (measured): " + ", ".join(
                 f"{d} {v / 1e9:,.1f} GFLOP/s" for d, v in res["peak_flops"].items())
             + f". Memory: {m['memory_method']}." + (f" {m['dtype_note']}." if m["dtype_note"]
                                                     else ""),
             "",
             "| model | params | segment | FLOPs/token fwd | train |",
             "|---|---:|---:|---:|---:|"]
    for name, info in res["models"].items():
        f = info["flops_per_token"]
        lines.append(f"| {name} | {info['params'] / 1e6:.2f}M | {info['segment']} | "
                     f"{f['infer'] / 1e6:.2f}M | {f['train'] / 1e6:.2f}M |")
    lines += ["", "| mode | dtype | model | batch x length | tokens/s | segment ms | "
              "peak mem MiB | model GFLOP/s | MFU | CPU share | tokens/CPU-s |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = lambda r: (MODES.index(r["mode"]), DTYPES.index(r["dtype"]),
                       MODELS.index(r["model"]), r["length"])
    for r in sorted(res["results"], key=order):
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['model']} | {r['batch_size']} x "
                     f"{r['length']} | {fmt(r['tokens_per_s'])} | "
                     f"{fmt(r['segment_ms_median'], '.1f')} | {fmt(r['peak_mem_mib'], '.1f')} | "
                     f"{r['model_tflops_per_s'] * 1e3:.2f} | {100 * r['mfu']:.1f}% | "
                     f"{r['cpu_share']:.0%} | {r['tokens_per_cpu_s']:,.0f} |")
    lines += ["", f"Ratios (largest / smallest length; linear cost: tokens/s ratio within "
              f"{TARGET_LINEAR:.0%} of 1; step time vs Slide, target recurrent <= "
              f"{TARGET_REC_OVER_SLIDE}). Each as wall time, and as process CPU time, which "
              f"drops the waits for a busy core:", "",
              "| mode | dtype | model | lengths | tokens/s ratio | same, CPU time | "
              "peak mem ratio | step time / Slide | same, CPU time | FLOPs / Slide |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in res["summary"]:
        lin = functools.partial(_linear_mark, s)
        vs = functools.partial(_vs_slide_mark, s)
        mem = "-" if s["smallest"] == s["largest"] else fmt(s["peak_mem_ratio"], ".2f")
        lines.append(f"| {s['mode']} | {s['dtype']} | {s['model']} | {s['largest']}/"
                     f"{s['smallest']} | {lin(s['throughput_ratio'])} | "
                     f"{lin(s['cpu_throughput_ratio'])} | {mem} | "
                     f"{vs(s['step_time_vs_slide'])} | {vs(s['cpu_time_vs_slide'])} | "
                     f"{fmt(s['flops_vs_slide'], '.3f')} |")
    lines.append(f"\nWall time {m['wall_s']:.0f}s. Load average {fmt(m['loadavg_start'], '.1f')} "
                 f"at start, {fmt(m['loadavg_end'], '.1f')} at end ({os.cpu_count()} CPUs). "
                 f"CPU share = process CPU time / (wall time x threads): below ~90% the "
                 f"machine was busy with other work (or threads idled); above 100% on short "
                 f"runs, OpenMP workers spin-waiting between ops.")
    return "\n".join(lines)


def format_reference(res: dict) -> str:
    """Our recurrent-model figures on the reference config beside the port's and the targets."""
    lines = ["", "### Reference config (issue 5): recurrent model, batch 4, stream 2048",
             "", "| mode | dtype | ours tokens/s | port tokens/s | ours / port | target | met | "
             "bound at 100% MFU |", "|---|---|---:|---:|---:|---:|---|---:|"]
    fpt = res["models"]["recurrent"]["flops_per_token"]
    for r in res["results"]:
        if r["model"] != "recurrent":
            continue
        port = PORT_TOKENS_PER_S[r["mode"], r["dtype"]]
        target = TARGET_TOKENS_PER_S[r["mode"]]
        bound = res["peak_flops"][r["dtype"]] / fpt[r["mode"]]
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['tokens_per_s']:,.0f} | {port:,} | "
                     f"{r['tokens_per_s'] / port:.2f}x | {target:,} | "
                     f"{'yes' if r['tokens_per_s'] >= target else 'no'} | {bound:,.0f} |")
    lines.append("\nPort figures and targets are the issue's, measured elsewhere; compare with the "
                 "port only in one run on one machine (benchmarks/bench_vs_port.py). The bound is "
                 "the measured matmul peak over the model FLOPs per token: no implementation of "
                 "the same arithmetic exceeds it on this machine and thread count.")
    return "\n".join(lines)


def write_results(res, out_json, out_md, verbose, extra_md: str = "") -> None:
    md = format_markdown(res) + extra_md
    if verbose:
        print(md, flush=True)
    if out_json:
        Path(out_json).write_text(json.dumps(res, indent=2))
    if out_md:
        Path(out_md).write_text(md + "\n")
