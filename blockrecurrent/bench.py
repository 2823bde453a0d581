"""Throughput, memory and FLOP-utilisation benchmark of the model against its two baselines.

    python -m blockrecurrent.bench                    # "small" preset, lengths 1024 4096 16384
    python -m blockrecurrent.bench --reference        # issue 5's reference config vs the port
    python -m blockrecurrent.bench --lengths 1024 65536 --dtypes fp32 bf16 --json out.json

Three models are built from one config (paper section 4 names the baselines):
- "rec":   the Block-Recurrent Transformer itself;
- "slide": the same sliding window and previous-block cache, no recurrent layer;
- "xl":    Slide with training segments of one block (max_seq_len = block_width), i.e.
           Transformer-XL with segment = window.
Each model streams N tokens per batch row segment by segment (segment = its max_seq_len), carrying
its memories and states (returned detached) from one segment to the next. Training runs forward +
cross-entropy + backward + AdamW step per segment; inference runs the forward under
torch.inference_mode. tokens/s counts batch_size * N tokens over the wall time of the stream.
A timed pass runs short streams several times back to back (at least 8 segments a pass; a 1k
stream of 512-token segments is run 4 times), so that short lengths are not timed on a blink.

Peak memory is the high-water mark of resident memory *above the resident memory at the start of
the stream* (model, optimizer state and torch itself excluded), measured in a separate, untimed
pass of each model and length before any timed work. On CPU the kernel's per-process peak
(VmHWM) is reset before the pass (write "5" to /proc/self/clear_refs, Linux >= 4.0) after glibc's
free heap is returned to the system (malloc_trim), and during the pass glibc serves blocks of
16 KiB and more by mmap, so that freed tensors go back to the system at once and the peak is that
of live data. (With glibc's
default heap, fragments left over the passes add a few MiB that grow slowly with the number of
segments: not memory the model keeps, but a length-dependent figure all the same.) On CUDA it is
the caching allocator's max_memory_allocated above the allocation at the start. Where neither is
available the figure is reported as missing rather than guessed.

Model FLOPs are counted from the config (matmuls only, 2 FLOPs per multiply-add; norms, softmax,
rotary and gates are left out, as is usual): forward per token, training = 3x forward. MFU is the
achieved model FLOP rate over the matmul peak measured in the same run (best of a few large square
matmuls per dtype), so it is comparable across machines but not a vendor peak.

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

FLOP-count caveats: with use_compressed_mem, each call re-compresses the cached blocks, which is
not counted; the fused attention path may run fewer FLOPs than counted where it skips masked
tiles. tests/test_bench.py checks the count against torch's FlopCounterMode on the plain path.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import PRESETS, BlockRecurrentConfig
from .model import BlockRecurrentTransformer
from .train import apply_baseline, load_train_config, make_optimizer

DTYPES = ("fp32", "bf16")
MODES = ("train", "infer")
MODELS = ("rec", "slide", "xl")

# Issue 5's reference configuration and the figures of the best-known PyTorch port
# (block-recurrent-transformer-pytorch 0.4.4) on it, batch 4, stream of 2048 tokens.
REFERENCE_CONFIG = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, block_width=128,
                        max_seq_len=1024, num_state_vectors=128, recurrent_layers=(3,))
REFERENCE_RUN = dict(batch_size=4, lengths=(2048,))
PORT_TOKENS_PER_S = {("train", "fp32"): 5_500, ("train", "bf16"): 8_700,
                     ("infer", "fp32"): 18_000, ("infer", "bf16"): 33_000}
TARGET_TOKENS_PER_S = {"train": 13_000, "infer": 50_000}
TARGET_LINEAR = 0.10  # tokens/s at the largest length within 10% of the smallest
TARGET_REC_OVER_SLIDE = 1.15  # recurrent step time at most 15% above Slide's

_MIB = 2 ** 20


# --------------------------------------------------------------------------- model FLOPs


def flops_breakdown(config: BlockRecurrentConfig) -> dict[str, float]:
    """Forward matmul FLOPs per token by component. Attention is counted as computed, not as
    useful: each block of W queries scores all 2W keys of blocks t-1 and t (the banded kernel
    masks about half of them), plus W extra compressed keys with use_compressed_mem. State-side
    work happens once per block of W tokens and is divided by W here."""
    E, H, D, W, S = config.dim, config.heads, config.dim_head, config.block_width, \
        config.num_state_vectors
    HD, M, V = H * D, int(config.mlp_mult * config.dim), config.num_tokens
    n_rec = len(config.recurrent_layers)
    n_plain = config.depth - n_rec
    keys = 2 * W + (W if config.use_compressed_mem else 0)  # keys each query scores
    attn = 4 * keys * HD  # q.k and p.v over `keys` keys, every head
    mlp = 4 * E * M  # E -> M -> E
    # Strided conv c:1 over keys and values: (W/c) outputs * HD*HD*c MACs each, per block of W.
    comp = 4 * HD * HD if config.use_compressed_mem else 0
    out = {
        "plain_layers": n_plain * (2 * E * 3 * HD + attn + 2 * HD * E + mlp + comp),
        "logits": 2 * E * V,
    }
    if n_rec:
        token = 2 * E * 4 * HD + attn + 4 * S * HD + 2 * 2 * HD * E + mlp + comp
        state = (2 * S * E * 4 * HD  # K_s, V_s, Q_s, Q2_s
                 + 4 * S * S * HD  # state self-attention, S x S
                 + 4 * S * 2 * W * HD  # state cross-attention, S x 2W token keys
                 + 2 * S * 2 * HD * E)  # state output projection
        if config.gate == "lstm":
            state += 2 * S * 2 * HD * 2 * E
        if config.variant == "dual":
            state += 4 * S * E * M + (2 * S * E * 2 * E if config.gate == "lstm" else 0)
        out["recurrent_tokens"] = n_rec * token
        out["recurrent_state"] = n_rec * state / W
    return out


def flops_per_token(config: BlockRecurrentConfig, training: bool = False) -> float:
    """Model FLOPs per token at steady state (whole blocks); training = forward + 2x backward."""
    return sum(flops_breakdown(config).values()) * (3 if training else 1)


def count_flops(config: BlockRecurrentConfig, n_tokens: int, training: bool = False) -> float:
    """Model FLOPs of one stream of n_tokens (per batch row); the state advances only on complete
    blocks, so the state-side share is counted per complete block."""
    bd = flops_breakdown(config)
    state = bd.pop("recurrent_state", 0.0) * config.block_width
    total = sum(bd.values()) * n_tokens + state * (n_tokens // config.block_width)
    return total * (3 if training else 1)


# --------------------------------------------------------------------------- machine probes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def matmul_peak(dtype: str, device: torch.device, max_n: int | None = None,
                budget_s: float = 1.0) -> dict:
    """Best FLOP/s of square matmuls of the given dtype, in both weight layouts (a @ b, and
    F.linear's a @ b.T, which the model's projections use: CPU bf16 fallbacks differ ~8x between
    them). The size doubles until one product takes about 50 ms (or max_n), so machines without
    fast kernels (bf16 on a CPU without AVX512-BF16 / AMX) are probed without minute-long
    products."""
    max_n = max_n or (8192 if device.type == "cuda" else 2048)
    dt = _torch_dtype(dtype)
    n, best, best_n = 256, 0.0, 256
    while True:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        slowest = 0.0
        for op in (torch.matmul, F.linear):
            op(a, b)  # warm-up: kernel selection, page faults
            _sync(device)
            times, t_start = [], time.perf_counter()
            while len(times) < 3 or (len(times) < 10 and
                                     time.perf_counter() - t_start < budget_s / 8):
                t0 = time.perf_counter()
                op(a, b)
                _sync(device)
                times.append(time.perf_counter() - t0)
            rate = 2 * n ** 3 / min(times)  # best time: a peak, not a typical rate
            if rate > best:
                best, best_n = rate, n
            slowest = max(slowest, min(times))
        if n >= max_n or slowest > 0.05:
            break
        n *= 2
    return {"flops_per_s": best, "n": best_n}


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system, so a new RSS baseline counts live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory above the level at start() (bytes), or None where it cannot be measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "unavailable"
        if device.type == "cpu" and self._reset_hwm() and _proc_status_kib("VmHWM") is not None:
            self.method = "rss_hwm_reset"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak resident set size to the current one
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def exact(self):
        """On CPU with glibc: for the duration, blocks of 16 KiB and more are mmapped, so that
        freed tensors leave the resident set at once (run before any timed work: blocks already
        in the heap would be reused). Afterwards large blocks come from the heap again."""
        exact = self.method == "rss_hwm_reset" and _mallopt(_M_MMAP_THRESHOLD, 16 * 1024)
        try:
            yield
        finally:
            if exact:
                _mallopt(_M_MMAP_THRESHOLD, 32 * _MIB)

    def measure(self, fn) -> int | None:
        """Run fn() and return the peak memory it used above the level before it."""
        self.start()
        fn()
        return self.peak()

    def start(self) -> None:
        gc.collect()
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.method == "rss_hwm_reset":
            _malloc_trim()
            self.base = _proc_status_kib("VmRSS") * 1024
            self._reset_hwm()

    def peak(self) -> int | None:
        if self.method == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.method == "rss_hwm_reset":
            return max(0, _proc_status_kib("VmHWM") * 1024 - self.base)
        return None


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls have real kernels here (otherwise bf16 runs measure an emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# --------------------------------------------------------------------------- decoding

DECODE_PATHS = ("fast", "legacy", "compiled")


def decode_bytes(model: BlockRecurrentTransformer, batch: int, cache_len: int) -> dict:
    """Bytes one decoding step must read: every weight it multiplies by (once per step,
    whatever the batch), and per row the cached keys/values its window reads (up to W per
    layer with the sliding window, the whole cache with "block") and the state keys/values."""
    from .decode import _weights

    from .attention import WindowPlan

    cfg = model.config
    params = _weights(model)[1:] + [model.to_logits.weight]  # the embedding is only indexed
    weights = sum(w.numel() * w.element_size() for w in params)
    size = model.token_emb.weight.element_size()
    read = cache_len + 1 - WindowPlan.step_start(cfg, cache_len)  # keys the step reads
    per_row = size * (2 * cfg.depth * read * cfg.inner_dim
                      + 2 * len(cfg.recurrent_layers) * cfg.num_state_vectors * cfg.inner_dim)
    return {"weights": weights, "cache_per_row": per_row, "total": weights + batch * per_row}


def read_seconds(nbytes: int, device: torch.device, repeats: int = 30) -> float:
    """Best time to read nbytes once here (a sum over an fp32 buffer of that size, warm): the
    floor of any step that reads that much memory (on CPU a ~15 MB model sits in the last-level
    cache after the first step, as the weights do when decoding)."""
    buf = torch.randn(max(1, nbytes // 4), device=device)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        buf.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def decode_speed(model: BlockRecurrentTransformer, *, batches=(1, 8, 32), prompt_len: int = 16,
                 new_tokens: int = 64, repeats: int = 5, paths=("fast", "legacy"),
                 seed: int = 0, log=lambda *a: None) -> list[dict]:
    """Greedy decoding tokens/s (batch * steps / s) after a prompt of prompt_len tokens, at each
    batch size, for each path: "fast" (blockrecurrent.decode.step, the default), "legacy" (the
    general path, model.fast_decode = False) and "compiled" (model.compile_decode()). Paths
    alternate within every repeat; medians over repeats, plus per-step wall and CPU seconds
    and the read bound (decode_bytes / read_seconds, measured here) for each batch."""
    from .generation import generate

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
        wall = {k: [] for k in paths}
        cpu = {k: [] for k in paths}
        for rep in range(repeats):
            for path in paths:
                model.fast_decode = path != "legacy"
                model._compiled_decode = compiled if path == "compiled" else None
                c0, t0 = _cpu_seconds(), time.perf_counter()
                generate(model, None, new_tokens, do_sample=False, past=start, return_state=True)
                wall[path].append((time.perf_counter() - t0) / new_tokens)
                cpu[path].append((_cpu_seconds() - c0) / new_tokens)
            model.fast_decode, model._compiled_decode = True, None
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
                l / f for f, l in zip(wall["fast"], wall["legacy"]))
        if "compiled" in paths:
            row["compile_seconds"] = compile_s
            row["compiled_over_fast"] = statistics.median(
                f / c for f, c in zip(wall["fast"], wall["compiled"])) if "fast" in paths else None
        rows.append(row)
        log(f"[decode] batch {b}: " + ", ".join(
            f"{k} {row[k]['tokens_per_s']:,.0f} tok/s" for k in paths)
            + f"; weights read {1e3 * t_w:.2f} ms, +cache {1e3 * t_all:.2f} ms")
    return rows


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
            f" | {_fmt(ratio, '.2f')}x | {r['weights_bound_tokens_per_s']:,.0f} "
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
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
               else contextlib.nullcontext())
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
                _sync(device)
                times.append(time.perf_counter() - t0)
        return times


MIN_PASS_SEGMENTS = 8


def streams_per_pass(n: int, segment: int) -> int:
    """How many streams of n tokens one timed pass runs: enough for MIN_PASS_SEGMENTS segments."""
    return max(1, math.ceil(MIN_PASS_SEGMENTS / math.ceil(n / segment)))


def baseline_configs(config: BlockRecurrentConfig, baselines: bool = True
                     ) -> dict[str, BlockRecurrentConfig]:
    """The recurrent model and, if asked, the Slide and XL baselines built from its config (the
    trainer's `apply_baseline`)."""
    # A config without recurrent layers is itself the Slide model: name it so.
    out = {"rec": config} if config.recurrent_layers else {"slide": config}
    if baselines:
        out["slide"] = apply_baseline(config, "slide")
        out["xl"] = apply_baseline(config, "xl")
    return out


def _median(xs):
    return statistics.median(xs) if xs else None


def _resolve_dtypes(dtypes, device: torch.device) -> tuple[tuple[str, ...], str | None]:
    if dtypes == "auto":
        if bf16_is_fast(device):
            return DTYPES, None
        return ("fp32",), ("bf16 skipped: no fast bf16 matmul kernels on this device "
                           "(pass --dtypes fp32 bf16 to measure the emulation anyway)")
    dtypes = tuple(dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"invalid dtypes={dtypes!r}: choose from {DTYPES} or 'auto'")
    return dtypes, None


def run_benchmark(config: BlockRecurrentConfig, *, batch_size: int = 1,
                  lengths=(1024, 4096, 16384), modes=MODES, dtypes="auto", baselines: bool = True,
                  repeats: int = 3, compile: bool = False, device: str | torch.device = "cpu",
                  seed: int = 0, out_json: str | os.PathLike | None = None,
                  out_md: str | os.PathLike | None = None, verbose: bool = True) -> dict:
    """Measure training and inference throughput, peak memory and MFU of the recurrent model
    (and of its Slide and XL baselines) on streams of each length in `lengths` tokens per row.
    dtypes: a tuple of "fp32"/"bf16", or "auto" (fp32, plus bf16 where it has fast kernels).
    Returns a JSON-ready dict (see format_markdown for how it reads); prints progress and the
    table if verbose, and writes out_json / out_md if given."""
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
    device = torch.device(device)
    dtypes, dtype_note = _resolve_dtypes(dtypes, device)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    t_begin = time.perf_counter()

    load = _loadavg()
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
    runners, models_info = {}, {}
    for name, cfg in baseline_configs(config, baselines).items():
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

    # Memory first, in untimed passes, after a two-segment warm-up (the optimizer state is
    # allocated at the first step: not part of a stream's peak).
    with meter.exact():
        for dtype in dtypes:
            for mode in modes:
                for r in runners.values():
                    r.stream(tokens, min(2 * r.segment, tokens.shape[1] - 1), mode, dtype)
        mems = {(dtype, mode, n, name): meter.measure(lambda: r.stream(tokens, n, mode, dtype))
                for dtype in dtypes for mode in modes for n in lengths
                for name, r in runners.items()}
        log(f"[bench] memory passes: {time.perf_counter() - t_begin:.0f}s")

    results, pair_ratios = [], []
    for dtype in dtypes:
        for mode in modes:
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
                        c0 = _cpu_seconds()
                        seg_times = [t for _ in range(k) for t in r.stream(tokens, n, mode, dtype)]
                        # Per stream: seconds of CPU and of wall time.
                        cpu[name, n].append((_cpu_seconds() - c0) / k)
                        runs[name, n].append(seg_times)
                        pass_times[name] = sum(seg_times) / k
                        pass_cpu[name] = cpu[name, n][-1]
                    # Same pass, same machine load: ratio of time per token (same n for both).
                    for name in ("rec", "xl"):
                        if name in pass_times and "slide" in pass_times:
                            pair_ratios.append(dict(
                                model=name, mode=mode, dtype=dtype, length=n,
                                ratio=pass_times[name] / pass_times["slide"],
                                cpu_ratio=pass_cpu[name] / max(pass_cpu["slide"], 1e-9)))
                    log(f"[bench] {mode} {dtype} n={n} rep {rep + 1}/{repeats}: " + ", ".join(
                        f"{k} {batch_size * n / t:,.0f} tok/s" for k, t in pass_times.items()))
            for (name, n), seg_lists in runs.items():
                info = models_info[name]
                k = streams_per_pass(n, info["segment"])
                tps = [batch_size * n * k / sum(s) for s in seg_lists]
                seg_ms = [1e3 * t for s in seg_lists for t in s]
                peak = mems[dtype, mode, n, name]
                fpt = info["flops_per_token"][mode]
                rate = _median(tps)
                results.append(dict(
                    model=name, mode=mode, dtype=dtype, length=n, batch_size=batch_size,
                    segment=info["segment"], tokens_per_s=rate, tokens_per_s_runs=tps,
                    segment_ms_median=_median(seg_ms),
                    peak_mem_mib=peak / _MIB if peak is not None else None,
                    model_tflops_per_s=fpt * rate / 1e12,
                    # Throughput per second of process CPU time: on a shared CPU with one
                    # thread, scheduling noise (waiting for a core) drops out of it.
                    tokens_per_cpu_s=_median([batch_size * n / max(c, 1e-9)
                                              for c in cpu[name, n]]),
                    cpu_share=_median([k * c / sum(s) for c, s in zip(cpu[name, n], seg_lists)])
                    / torch.get_num_threads(),
                    mfu=fpt * rate / peaks[dtype]["flops_per_s"]))

    summary = _summarise(results, pair_ratios, models_info)
    out = dict(
        meta=dict(torch=torch.__version__, python=platform.python_version(),
                  machine=platform.machine(), processor=_cpu_name(), device=str(device),
                  threads=torch.get_num_threads(), compile=compile, repeats=repeats,
                  bf16_fast_kernels=bf16_is_fast(device), dtype_note=dtype_note,
                  memory_method=meter.method, loadavg_start=load, wall_s=None),
        config=config.to_dict(), models=models_info,
        peak_flops={d: p["flops_per_s"] for d, p in peaks.items()},
        results=results, step_time_vs_slide=pair_ratios, summary=summary)
    out["meta"]["wall_s"] = time.perf_counter() - t_begin
    out["meta"]["loadavg_end"] = _loadavg()
    _write(out, out_json, out_md, verbose)
    return out


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


def _cpu_seconds() -> float:
    return time.process_time()  # all threads of the process, nanosecond clock


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --------------------------------------------------------------------------- reports


def _fmt(x, spec=",.0f", none="-"):
    return none if x is None else format(x, spec)


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
                     f"{r['length']} | {_fmt(r['tokens_per_s'])} | "
                     f"{_fmt(r['segment_ms_median'], '.1f')} | {_fmt(r['peak_mem_mib'], '.1f')} | "
                     f"{r['model_tflops_per_s'] * 1e3:.2f} | {100 * r['mfu']:.1f}% | "
                     f"{r['cpu_share']:.0%} | {r['tokens_per_cpu_s']:,.0f} |")
    lines += ["", f"Ratios (largest / smallest length; linear cost: tokens/s ratio within "
              f"{TARGET_LINEAR:.0%} of 1; step time vs Slide, target rec <= "
              f"{TARGET_REC_OVER_SLIDE}). Each as wall time, and as process CPU time, which "
              f"drops the waits for a busy core:", "",
              "| mode | dtype | model | lengths | tokens/s ratio | same, CPU time | "
              "peak mem ratio | step time / Slide | same, CPU time | FLOPs / Slide |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in res["summary"]:
        def lin(x):
            if s["smallest"] == s["largest"]:  # one length: nothing to compare
                return "-"
            return f"{x:.3f} " + ("ok" if abs(x - 1) <= TARGET_LINEAR else "MISS")

        def vs(x):
            if x is None:
                return "-"
            ok = " ok" if x <= TARGET_REC_OVER_SLIDE else " MISS"
            return f"{x:.3f}" + (ok if s["model"] == "rec" else "")
        mem = "-" if s["smallest"] == s["largest"] else _fmt(s["peak_mem_ratio"], ".2f")
        lines.append(f"| {s['mode']} | {s['dtype']} | {s['model']} | {s['largest']}/"
                     f"{s['smallest']} | {lin(s['throughput_ratio'])} | "
                     f"{lin(s['cpu_throughput_ratio'])} | {mem} | "
                     f"{vs(s['step_time_vs_slide'])} | {vs(s['cpu_time_vs_slide'])} | "
                     f"{_fmt(s['flops_vs_slide'], '.3f')} |")
    lines.append(f"\nWall time {m['wall_s']:.0f}s. Load average {_fmt(m['loadavg_start'], '.1f')} "
                 f"at start, {_fmt(m['loadavg_end'], '.1f')} at end ({os.cpu_count()} CPUs). "
                 f"CPU share = process CPU time / (wall time x threads): below ~90% the "
                 f"machine was busy with other work (or threads idled); above 100% on short "
                 f"runs, OpenMP workers spin-waiting between ops.")
    return "\n".join(lines)


def format_reference(res: dict) -> str:
    """Our recurrent-model figures on the reference config beside the port's and the targets."""
    lines = ["", "### Reference config (issue 5): recurrent model, batch 4, stream 2048",
             "", "| mode | dtype | ours tokens/s | port tokens/s | ours / port | target | met | "
             "bound at 100% MFU |", "|---|---|---:|---:|---:|---:|---|---:|"]
    fpt = res["models"]["rec"]["flops_per_token"]
    for r in res["results"]:
        if r["model"] != "rec":
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


def _write(res, out_json, out_md, verbose, extra_md: str = "") -> None:
    md = format_markdown(res) + extra_md
    if verbose:
        print(md, flush=True)
    if out_json:
        Path(out_json).write_text(json.dumps(res, indent=2))
    if out_md:
        Path(out_md).write_text(md + "\n")


def run_reference(*, dtypes=DTYPES, modes=MODES, baselines: bool = True, repeats: int = 5,
                  compile: bool = False, device="cpu", out_json=None, out_md=None,
                  verbose: bool = True) -> dict:
    """Issue 5's reference benchmark: REFERENCE_CONFIG, batch 4, one stream of 2048 tokens."""
    res = run_benchmark(BlockRecurrentConfig(**REFERENCE_CONFIG), modes=modes, dtypes=dtypes,
                        baselines=baselines, repeats=repeats, compile=compile, device=device,
                        verbose=verbose, **REFERENCE_RUN)  # prints the main table
    res["reference"] = dict(port_tokens_per_s={f"{m}/{d}": v for (m, d), v in
                                               PORT_TOKENS_PER_S.items()},
                            targets=TARGET_TOKENS_PER_S)
    ref_md = format_reference(res)
    if verbose:
        print(ref_md, flush=True)
    _write(res, out_json, out_md, False, ref_md)
    return res


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, for `brt bench` and `python -m blockrecurrent.bench`."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", default="small", choices=sorted(PRESETS),
                       help="model preset (default: small)")
    which.add_argument("--config", type=Path,
                       help="a model config.json (as save_pretrained writes) instead of a preset")
    which.add_argument("--reference", action="store_true",
                       help="issue 5's reference config, batch 4, stream 2048, fp32 and bf16, "
                            "beside the port's figures and the targets")
    parser.add_argument("--batch-size", type=int, help="batch rows (default 1)")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="stream lengths in tokens per row (default: 1024 4096 16384)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="train (forward, loss, backward, AdamW step) and/or infer")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=DTYPES,
                        help="default: fp32, plus bf16 where the device has fast bf16 kernels "
                             "(with --reference: both)")
    parser.add_argument("--no-baselines", action="store_true", help="only the recurrent model")
    parser.add_argument("--repeats", type=int, default=None,
                        help="passes per length; the median is reported (default 3; 5 with "
                             "--reference)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (with --decode: also time the compiled "
                             "decoding step)")
    parser.add_argument("--decode", action="store_true",
                        help="benchmark cached decoding instead of streams: tokens/s at each "
                             "--decode-batches size for the fast and the legacy (general) step, "
                             "against the memory-read bound measured in the same run")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32],
                        help="with --decode: batch sizes (default 1 8 32)")
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="with --decode: prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="with --decode: steps per timed run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--md", type=Path, help="write the tables as markdown")
    parser.add_argument("model_overrides", nargs="*", metavar="key=value",
                        help="model settings over the preset, values as TOML "
                             "(e.g. depth=12 recurrent_layers=[10])")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(modes=args.modes, baselines=not args.no_baselines, compile=args.compile,
                  device=args.device, out_json=args.json, out_md=args.md)
    if args.model_overrides and (args.config or args.reference):
        raise ValueError("key=value model settings apply to a --preset; edit the config file "
                         "instead")
    if args.decode:
        return run_decode(args)
    if args.reference:
        if args.batch_size is not None or args.lengths is not None:
            raise ValueError("--reference fixes batch 4 and a 2048-token stream; drop "
                             "--batch-size/--lengths or benchmark a --preset/--config instead")
        return run_reference(dtypes=args.dtypes or DTYPES, repeats=args.repeats or 5, **common)
    config = (BlockRecurrentConfig.from_json(args.config) if args.config
              else load_train_config(preset=args.preset,
                                     overrides=[f"model.{o}" for o in args.model_overrides])[0])
    return run_benchmark(config, batch_size=args.batch_size or 1,
                         lengths=args.lengths or (1024, 4096, 16384),
                         dtypes=args.dtypes or "auto", repeats=args.repeats or 3, **common)


def run_decode(args: argparse.Namespace) -> dict:
    """`--decode`: decoding tokens/s of one model (random weights) at several batch sizes."""
    if args.reference:
        config = BlockRecurrentConfig(**REFERENCE_CONFIG)
    elif args.config:
        config = BlockRecurrentConfig.from_json(args.config)
    else:
        config = load_train_config(preset=args.preset,
                                   overrides=[f"model.{o}" for o in args.model_overrides])[0]
    if min(args.decode_batches) < 1 or args.prompt_len < 1 or args.new_tokens < 1:
        raise ValueError("--decode-batches, --prompt-len and --new-tokens must be >= 1")
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(config).to(args.device).eval()
    paths = ("fast", "legacy") + (("compiled",) if args.compile else ())
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    log(f"[decode] {model.num_params() / 1e6:.2f}M non-embedding parameters, "
        f"{torch.get_num_threads()} threads, {_cpu_name() if args.device == 'cpu' else args.device}")
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


def cli(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m blockrecurrent.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        main(args)
    except (ValueError, TypeError) as err:  # bad settings: a message, not a traceback
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
