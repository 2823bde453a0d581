"""The benchmark's results as tables: the vocabulary of a results dict (modes, dtypes, models,
in table order), the markdown of a run (every figure measured in that run), and the JSON /
markdown files. Results name dtypes by their canonical names (model.dtypes: "float32",
"bfloat16"); the markdown tables label them short ("fp32", "bf16") to keep the columns narrow."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..model.dtypes import short_name
from .machine import fmt

DTYPES = ("float32", "bfloat16")  # the dtypes benchmarked, canonical names (model.dtypes)
MODES = ("train", "infer")
MODELS = ("recurrent", "slide", "xl")


def _ratio(s: dict, x) -> str:
    """A largest / smallest length ratio ("-" with one length: nothing to compare)."""
    return "-" if s["smallest"] == s["largest"] else f"{x:.3f}"


def format_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"### Benchmark: torch {m['torch']}, {m['device']} ({m['processor']}), "
             f"{m['threads']} threads, compile={m['compile']}, median of {m['repeats']}",
             "",
             "Matmul peak (measured): " + ", ".join(
                 f"{short_name(d)} {v / 1e9:,.1f} GFLOP/s" for d, v in res["peak_flops"].items())
             + f". Memory: {m['memory_method']}." + (f" {m['dtype_note']}." if m["dtype_note"]
                                                     else ""),
             "",
             "| model | layers | params | segment | FLOPs/token fwd | train |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, info in res["models"].items():
        f = info["flops_per_token"]
        lines.append(f"| {name} | {info['config']['depth']} | {info['params'] / 1e6:.2f}M | "
                     f"{info['segment']} | "
                     f"{f['infer'] / 1e6:.2f}M | {f['train'] / 1e6:.2f}M |")
    lines += ["", "| mode | dtype | model | batch x length | tokens/s | segment ms | "
              "peak mem MiB | model GFLOP/s | MFU | CPU share | tokens/CPU-s |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = lambda r: (MODES.index(r["mode"]), DTYPES.index(r["dtype"]),
                       MODELS.index(r["model"]), r["length"])
    for r in sorted(res["results"], key=order):
        lines.append(f"| {r['mode']} | {short_name(r['dtype'])} | {r['model']} | "
                     f"{r['batch_size']} x {r['length']} | {fmt(r['tokens_per_s'])} | "
                     f"{fmt(r['segment_ms_median'], '.1f')} | {fmt(r['peak_mem_mib'], '.1f')} | "
                     f"{r['model_tflops_per_s'] * 1e3:.2f} | {100 * r['mfu']:.1f}% | "
                     f"{r['cpu_share']:.0%} | {r['tokens_per_cpu_s']:,.0f} |")
    lines += ["", "Ratios: tokens/s and peak memory at the largest length over the smallest (a "
              "tokens/s ratio of 1: the cost per token does not grow with length); step time "
              "over Slide's at the largest length, paired pass by pass, beside the FLOP ratio. "
              "Each as wall time, and as process CPU time, which drops the waits for a busy "
              "core:", "",
              "| mode | dtype | model | lengths | tokens/s ratio | same, CPU time | "
              "peak mem ratio | step time / Slide | same, CPU time | FLOPs / Slide |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in res["summary"]:
        lin = functools.partial(_ratio, s)
        mem = "-" if s["smallest"] == s["largest"] else fmt(s["peak_mem_ratio"], ".2f")
        lines.append(f"| {s['mode']} | {short_name(s['dtype'])} | {s['model']} | {s['largest']}/"
                     f"{s['smallest']} | {lin(s['throughput_ratio'])} | "
                     f"{lin(s['cpu_throughput_ratio'])} | {mem} | "
                     f"{fmt(s['step_time_vs_slide'], '.3f')} | "
                     f"{fmt(s['cpu_time_vs_slide'], '.3f')} | "
                     f"{fmt(s['flops_vs_slide'], '.3f')} |")
    lines.append(f"\nWall time {m['wall_s']:.0f}s. Load average {fmt(m['loadavg_start'], '.1f')} "
                 f"at start, {fmt(m['loadavg_end'], '.1f')} at end ({os.cpu_count()} CPUs). "
                 f"CPU share = process CPU time / (wall time x threads): below ~90% the "
                 f"machine was busy with other work (or threads idled); above 100% on short "
                 f"runs, OpenMP workers spin-waiting between ops.")
    return "\n".join(lines)


def write_results(res, out_json, out_md, verbose) -> None:
    md = format_markdown(res)
    if verbose:
        print(md, flush=True)
    if out_json:
        Path(out_json).write_text(json.dumps(res, indent=2))
    if out_md:
        Path(out_md).write_text(md + "\n")
