"""Throughput, memory and FLOP-utilisation benchmark of the model against its two baselines.

    python -m blockrecurrent.bench                    # "small" preset, lengths 1024 4096 16384
    python -m blockrecurrent.bench --reference        # the reference config (REFERENCE_CONFIG)
    python -m blockrecurrent.bench --lengths 1024 65536 --dtypes fp32 bf16 --json out.json

Three models are built from one config of N layers (paper section 4 names the baselines; the
one definition is train.settings.baseline_configs, which `brt compare` trains):
- "recurrent": the Block-Recurrent Transformer itself, Rec:NL;
- "slide": the same sliding window and previous-block cache, no recurrent layer, Slide:NL;
- "xl":    XL:W, Transformer-XL with segment = window (max_seq_len = block_width), N + 1 layers
           deep like Slide:(N+1)L (the extra layer stands in for the recurrent cell's
           parameters); its "FLOPs / Slide" column counts that layer.
A config without recurrent layers is itself Slide:NL, and its XL is N layers deep.
Each model streams N tokens per batch row segment by segment (segment = its max_seq_len), carrying
its memories and states (returned detached) from one segment to the next. Training runs forward +
cross-entropy + backward + AdamW step per segment; inference runs the forward under
torch.inference_mode. tokens/s counts batch_size * N tokens over the wall time of the stream.
A timed pass runs short streams several times back to back (at least 8 segments a pass; a 1k
stream of 512-token segments is run 4 times), so that short lengths are not timed on a blink.

Timing on a shared machine is noisy: models and lengths are interleaved within each repeat, the
reported figure is the median over repeats, and ratios (Rec/Slide step time) are taken pass by
pass before the median, so slow drifts in machine load cancel. Each figure is also given per
second of process CPU time ("tokens/CPU-s", and the ratios "same, CPU time"): with --threads 1 on
a CPU shared with other jobs, that drops the time spent waiting for a core, which wall time
cannot; the "CPU share" column says how much of the wall time the process actually ran. With
several threads on a busy machine, OpenMP workers spin-wait for descheduled peers (small ops get
10-100x slower); use --threads 1 there, or OMP_WAIT_POLICY=PASSIVE.

Run time: the defaults ("small" preset, batch 1, lengths 1024 4096 16384, 3 repeats, fp32, three
models) took 6m45s on a 2-core EPYC with --threads 1 while other jobs held about half of the CPU;
about half that on an idle machine. --reference (fp32) took under 3 minutes there. bf16 on a CPU
without AVX512-BF16/AMX runs scalar fallback kernels ~100x slower than fp32, so "auto" leaves it
out; measuring it anyway takes tens of minutes.

Model FLOPs, the matmul peak and peak memory are measured as machine.py describes; --decode
runs decode.py. The command line is command.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ..memory import MIB, PeakMemory
from ..model.config import BlockRecurrentConfig
from ..model.dtypes import dtype_name, names_of
from ..model.transformer import BlockRecurrentTransformer
from ..train.optim import make_optimizer
from ..train.settings import baseline_configs
from .machine import (
    bf16_is_fast,
    cpu_name,
    cpu_seconds,
    flops_breakdown,
    flops_per_token,
    loadavg,
    matmul_peak,
    sync,
)
from .report import (
    DTYPES,
    MODELS,
    MODES,
    write_results,
)

# The reference config: a small fixed model (dim 256, depth 4, 4 x 64 heads, W = S = 128,
# segment 1024, recurrent layer 3) and run (batch 4, one 2048-token stream), the same on every
# machine, so that runs can be set beside each other (the benchmarks/*_vs_port.py scripts measure
# the port on it in the same run).
REFERENCE_CONFIG = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, block_width=128,
                        max_seq_len=1024, num_state_vectors=128, recurrent_layers=(3,))
REFERENCE_RUN = dict(batch_size=4, lengths=(2048,))


# --------------------------------------------------------------------------- streams


@dataclasses.dataclass
class Runner:
    """One model with its optimizer, and the stream loop for one mode and dtype."""
    name: str
    model: BlockRecurrentTransformer
    forward: object  # the model, or torch.compile of it
    optimizer: torch.optim.Optimizer
    segment: int

    def stream(self, tokens: torch.Tensor, n: int, mode: str, dtype: str) -> list[float]:
        """Feed tokens[:, :n] segment by segment; returns the seconds of each segment.
        tokens (b, >= n+1): the targets of training are the next tokens."""
        device = tokens.device
        amp = (torch.autocast(device.type, dtype=torch.bfloat16)
               if dtype_name(dtype) == "bfloat16" else contextlib.nullcontext())
        mems = states = None
        times = []
        self.model.train(mode == "train")
        grad = contextlib.nullcontext() if mode == "train" else torch.inference_mode()
        with grad:
            for i in range(0, n, self.segment):
                t0 = time.perf_counter()
                x = tokens[:, i:min(i + self.segment, n)]
                with amp:
                    logits, mems, states = self.forward(x, xl_memories=mems, states=states)
                if mode == "train":
                    y = tokens[:, i + 1:i + 1 + x.shape[1]]
                    with amp:  # cross_entropy runs in fp32 under autocast
                        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                    loss.backward()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                sync(device)
                times.append(time.perf_counter() - t0)
        return times


MIN_PASS_SEGMENTS = 8


def streams_per_pass(n: int, segment: int) -> int:
    """How many streams of n tokens one timed pass runs: enough for MIN_PASS_SEGMENTS segments."""
    return max(1, math.ceil(MIN_PASS_SEGMENTS / math.ceil(n / segment)))


def bench_models(config: BlockRecurrentConfig, baselines: bool = True
                 ) -> dict[str, BlockRecurrentConfig]:
    """The models timed, name -> config: the config's own model ("recurrent", or "slide" when it
    has no recurrent layer) and, if asked, Slide:NL and XL as train.settings.baseline_configs
    defines them (Slide:(N+1)L itself is not timed)."""
    models = {k: v for k, v in baseline_configs(config).items() if k in MODELS}
    own = next(iter(models))
    return models if baselines else {own: models[own]}


def _median(xs):
    return statistics.median(xs) if xs else None


def _resolve_dtypes(dtypes, device: torch.device) -> tuple[tuple[str, ...], str | None]:
    """The dtypes to time, canonical names (model.dtypes; aliases such as "fp32" accepted), and
    a note on why bfloat16 was left out of "auto"."""
    if dtypes == "auto":
        if bf16_is_fast(device):
            return DTYPES, None
        return ("float32",), ("bf16 skipped: no fast bf16 matmul kernels on this device "
                              "(pass --dtypes fp32 bf16 to measure the emulation anyway)")
    names = tuple(dtypes) if not isinstance(dtypes, str) else (dtypes,)
    if not names or any(d not in names_of(DTYPES) for d in names):
        raise ValueError(f"invalid dtypes={tuple(dtypes)!r}: choose from "
                         f"{names_of(DTYPES)} or 'auto'")
    return tuple(dict.fromkeys(dtype_name(d) for d in names)), None


def run_benchmark(config: BlockRecurrentConfig, *, batch_size: int = 1,
                  lengths=(1024, 4096, 16384), modes=MODES, dtypes="auto", baselines: bool = True,
                  repeats: int = 3, compile: bool = False, device: str | torch.device = "cpu",
                  seed: int = 0, out_json: str | os.PathLike | None = None,
                  out_md: str | os.PathLike | None = None, verbose: bool = True) -> dict:
    """Measure training and inference throughput, peak memory and MFU of the recurrent model
    (and of its Slide and XL baselines) on streams of each length in `lengths` tokens per row.
    dtypes: a tuple of "float32"/"bfloat16" (or "fp32"/"bf16"), or "auto" (float32, plus
    bfloat16 where it has fast kernels); results name them "float32"/"bfloat16".
    Returns a JSON-ready dict (see format_markdown for how it reads); prints progress and the
    table if verbose, and writes out_json / out_md if given."""
    _check_run(config, lengths, modes, batch_size, repeats)
    lengths, modes, device = tuple(int(n) for n in lengths), tuple(modes), torch.device(device)
    dtypes, dtype_note = _resolve_dtypes(dtypes, device)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    t_begin = time.perf_counter()
    load = loadavg()
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1) - 0.5:
        log(f"[bench] warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes "
            f"compete for the cores and timings will be low and noisy. With several torch "
            f"threads, OpenMP workers that spin-wait for a descheduled peer can make small "
            f"ops 10-100x slower: prefer --threads 1 or OMP_WAIT_POLICY=PASSIVE.")
    log(f"[bench] matmul peak on {device} ...")
    peaks = {d: matmul_peak(d, device) for d in dtypes}
    meter = PeakMemory(device)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.num_tokens, (batch_size, max(lengths) + 1),
                           generator=gen).to(device)
    runners, models_info = _build_runners(config, baselines, device, compile, seed)
    mems = _memory_passes(meter, runners, tokens, dtypes, modes, lengths)
    log(f"[bench] memory passes: {time.perf_counter() - t_begin:.0f}s")
    results, pair_ratios = [], []
    for dtype in dtypes:
        for mode in modes:
            runs, cpu = _timed_passes(runners, tokens, mode, dtype, lengths, repeats, batch_size,
                                      pair_ratios, log)
            for (name, n), seg_lists in runs.items():
                results.append(_result(name, mode, dtype, n, batch_size, models_info[name],
                                       seg_lists, cpu[name, n], mems[dtype, mode, n, name],
                                       peaks[dtype]["flops_per_s"]))
    summary = _summarise(results, pair_ratios, models_info)
    out = dict(
        meta=dict(torch=torch.__version__, python=platform.python_version(),
                  machine=platform.machine(), processor=cpu_name(), device=str(device),
                  threads=torch.get_num_threads(), compile=compile, repeats=repeats,
                  bf16_fast_kernels=bf16_is_fast(device), dtype_note=dtype_note,
                  memory_method=meter.method, loadavg_start=load, wall_s=None),
        config=config.to_dict(), models=models_info,
        peak_flops={d: p["flops_per_s"] for d, p in peaks.items()},
        results=results, step_time_vs_slide=pair_ratios, summary=summary)
    out["meta"]["wall_s"] = time.perf_counter() - t_begin
    out["meta"]["loadavg_end"] = loadavg()
    write_results(out, out_json, out_md, verbose)
    return out


def _check_run(config, lengths, modes, batch_size: int, repeats: int) -> None:
    if not isinstance(config, BlockRecurrentConfig):
        raise TypeError(f"config must be a BlockRecurrentConfig, got {type(config).__name__}")
    lengths = tuple(int(n) for n in lengths)
    modes = tuple(modes)
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"invalid lengths={lengths!r}: give positive token counts")
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"invalid modes={modes!r}: choose from {MODES}")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size={batch_size} and repeats={repeats} must be >= 1")


def _build_runners(config, baselines: bool, device, compile: bool, seed: int
                   ) -> tuple[dict[str, Runner], dict[str, dict]]:
    """A Runner per model (the same seed for each) and what is known of each before timing."""
    runners, models_info = {}, {}
    for name, cfg in bench_models(config, baselines).items():
        torch.manual_seed(seed)
        model = BlockRecurrentTransformer(cfg).to(device)
        fwd = torch.compile(model) if compile else model
        opt = make_optimizer(model, lr=1e-4)  # the trainer's optimizer
        runners[name] = Runner(name, model, fwd, opt, cfg.max_seq_len)
        models_info[name] = dict(
            config=cfg.to_dict(), params=sum(p.numel() for p in model.parameters()),
            params_non_embedding=model.num_params(), segment=cfg.max_seq_len,
            flops_per_token={"infer": flops_per_token(cfg), "train": flops_per_token(cfg, True)},
            flops_breakdown=flops_breakdown(cfg))
    return runners, models_info


def _memory_passes(meter: PeakMemory, runners: dict, tokens, dtypes, modes, lengths) -> dict:
    """Peak memory of every (dtype, mode, length, model) stream, in untimed passes after a
    two-segment warm-up (the optimizer state is allocated at the first step: not part of a
    stream's peak)."""
    with meter.exact():
        for dtype in dtypes:
            for mode in modes:
                for r in runners.values():
                    r.stream(tokens, min(2 * r.segment, tokens.shape[1] - 1), mode, dtype)
        return {(dtype, mode, n, name): meter.measure(functools.partial(r.stream, tokens, n,
                                                                        mode, dtype))
                for dtype in dtypes for mode in modes for n in lengths
                for name, r in runners.items()}


def _timed_passes(runners: dict, tokens, mode: str, dtype: str, lengths, repeats: int,
                  batch_size: int, pair_ratios: list, log) -> tuple[dict, dict]:
    """Segment times and CPU seconds per stream of every (model, length), over `repeats`
    interleaved passes; appends each pass's step-time ratios to Slide to pair_ratios."""
    # Warm-up: two segments (the first call has no memories, later ones do; compile
    # traces both), which also allocates the optimizer state before anything is timed.
    for r in runners.values():
        t0 = time.perf_counter()
        r.stream(tokens, min(2 * r.segment, tokens.shape[1] - 1), mode, dtype)
        log(f"[bench] warm-up {r.name} {mode} {dtype}: {time.perf_counter() - t0:.1f}s")
    runs = {(name, n): [] for name in runners for n in lengths}
    cpu = {(name, n): [] for name in runners for n in lengths}
    for rep in range(repeats):
        for n in lengths:
            pass_times, pass_cpu = {}, {}
            for name, r in runners.items():
                # A pass times whole streams, back to back, at least MIN_PASS_SEGMENTS
                # segments in all: a 2-segment stream alone is too short to time.
                k = streams_per_pass(n, r.segment)
                c0 = cpu_seconds()
                seg_times = [t for _ in range(k) for t in r.stream(tokens, n, mode, dtype)]
                # Per stream: seconds of CPU and of wall time.
                cpu[name, n].append((cpu_seconds() - c0) / k)
                runs[name, n].append(seg_times)
                pass_times[name] = sum(seg_times) / k
                pass_cpu[name] = cpu[name, n][-1]
            # Same pass, same machine load: ratio of time per token (same n for both).
            for name in ("recurrent", "xl"):
                if name in pass_times and "slide" in pass_times:
                    pair_ratios.append(dict(
                        model=name, mode=mode, dtype=dtype, length=n,
                        ratio=pass_times[name] / pass_times["slide"],
                        cpu_ratio=pass_cpu[name] / max(pass_cpu["slide"], 1e-9)))
            log(f"[bench] {mode} {dtype} n={n} rep {rep + 1}/{repeats}: " + ", ".join(
                f"{k} {batch_size * n / t:,.0f} tok/s" for k, t in pass_times.items()))
    return runs, cpu


def _result(name: str, mode: str, dtype: str, n: int, batch_size: int, info: dict,
            seg_lists: list, cpu: list, peak, peak_flops: float) -> dict:
    """One row of results: a model's medians over the passes at one mode, dtype and length."""
    k = streams_per_pass(n, info["segment"])
    tps = [batch_size * n * k / sum(s) for s in seg_lists]
    seg_ms = [1e3 * t for s in seg_lists for t in s]
    fpt = info["flops_per_token"][mode]
    rate = _median(tps)
    return dict(
        model=name, mode=mode, dtype=dtype, length=n, batch_size=batch_size,
        segment=info["segment"], tokens_per_s=rate, tokens_per_s_runs=tps,
        segment_ms_median=_median(seg_ms),
        peak_mem_mib=peak / MIB if peak is not None else None,
        model_tflops_per_s=fpt * rate / 1e12,
        # Throughput per second of process CPU time: on a shared CPU with one
        # thread, scheduling noise (waiting for a core) drops out of it.
        tokens_per_cpu_s=_median([batch_size * n / max(c, 1e-9) for c in cpu]),
        cpu_share=_median([k * c / sum(s) for c, s in zip(cpu, seg_lists, strict=True)])
        / torch.get_num_threads(),
        mfu=fpt * rate / peak_flops)


def _summarise(results: list[dict], pair_ratios: list[dict], models: dict) -> list[dict]:
    """Per model/mode/dtype: throughput and memory at the largest length over the smallest, and
    the median step-time ratio to Slide at the largest length beside the FLOP ratio (what the
    step-time ratio would be if every FLOP cost the same: the excess is implementation overhead)."""
    out = []
    keys = sorted({(r["model"], r["mode"], r["dtype"]) for r in results},
                  key=lambda k: (MODES.index(k[1]), DTYPES.index(k[2]), MODELS.index(k[0])))
    for model, mode, dtype in keys:
        rows = sorted((r for r in results if (r["model"], r["mode"], r["dtype"]) ==
                       (model, mode, dtype)), key=lambda r: r["length"])
        small, large = rows[0], rows[-1]
        mem = (large["peak_mem_mib"] / small["peak_mem_mib"]
               if large["peak_mem_mib"] and small["peak_mem_mib"] else None)
        pairs = [p for p in pair_ratios if (p["model"], p["mode"], p["dtype"], p["length"]) ==
                 (model, mode, dtype, large["length"])]
        flops = (models[model]["flops_per_token"][mode] / models["slide"]["flops_per_token"][mode]
                 if model != "slide" and "slide" in models else None)
        out.append(dict(model=model, mode=mode, dtype=dtype, smallest=small["length"],
                        largest=large["length"],
                        throughput_ratio=large["tokens_per_s"] / small["tokens_per_s"],
                        cpu_throughput_ratio=large["tokens_per_cpu_s"] / small["tokens_per_cpu_s"],
                        peak_mem_ratio=mem,
                        step_time_vs_slide=_median([p["ratio"] for p in pairs]),
                        cpu_time_vs_slide=_median([p["cpu_ratio"] for p in pairs]),
                        flops_vs_slide=flops))
    return out


def run_reference(*, dtypes=DTYPES, modes=MODES, baselines: bool = True, repeats: int = 5,
                  compile: bool = False, device="cpu", out_json=None, out_md=None,
                  verbose: bool = True) -> dict:
    """The reference benchmark: REFERENCE_CONFIG, batch 4, one stream of 2048 tokens."""
    return run_benchmark(BlockRecurrentConfig(**REFERENCE_CONFIG), modes=modes, dtypes=dtypes,
                         baselines=baselines, repeats=repeats, compile=compile, device=device,
                         out_json=out_json, out_md=out_md, verbose=verbose, **REFERENCE_RUN)
