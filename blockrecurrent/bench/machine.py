"""What a benchmark run costs and what the machine can do: model FLOPs counted from the
config, the matmul peak, peak memory above a baseline, CPU time, load and processor name.

Model FLOPs are counted from the config (matmuls only, 2 FLOPs per multiply-add; norms, softmax,
rotary and gates are left out, as is usual): forward per token, training = 3x forward. MFU is the
achieved model FLOP rate over the matmul peak measured in the same run (best of a few large square
matmuls per dtype), so it is comparable across machines but not a vendor peak.

FLOP-count caveats: with use_compressed_mem, each call re-compresses the cached blocks, which is
not counted; the fused attention path may run fewer FLOPs than counted where it skips masked
tiles. tests/test_bench.py checks the count against torch's FlopCounterMode on the plain path.

Peak memory: memory.PeakMemory.
"""

from __future__ import annotations

import os
import platform
import time

import torch
import torch.nn.functional as F

from ..model.cell import mlp_widths
from ..model.config import BlockRecurrentConfig
from ..model.dtypes import torch_dtype

# --------------------------------------------------------------------------- model FLOPs


def flops_breakdown(config: BlockRecurrentConfig) -> dict[str, float]:
    """Forward matmul FLOPs per token by component. Attention is counted as computed, not as
    useful: each block of W queries scores all 2W keys of blocks t-1 and t (the banded kernel
    masks about half of them), plus W extra compressed keys with use_compressed_mem. State-side
    work happens once per block of W tokens and is divided by W here."""
    E, H, D, W, S = config.dim, config.heads, config.dim_head, config.block_width, \
        config.num_state_vectors
    HD, V = H * D, config.num_tokens
    up, hidden = mlp_widths(config)
    n_rec = len(config.recurrent_layers)
    n_plain = config.depth - n_rec
    keys = 2 * W + (W if config.use_compressed_mem else 0)  # keys each query scores
    attn = 4 * keys * HD  # q.k and p.v over `keys` keys, every head
    mlp = 2 * E * up + 2 * hidden * E  # E -> up (GEGLU: two halves) -> hidden -> E
    # Strided conv c:1 over keys and values: (W/c) outputs * HD*HD*c MACs each, per block of W.
    comp = 4 * HD * HD if config.use_compressed_mem else 0
    out = {
        "plain_layers": n_plain * (2 * E * 3 * HD + attn + 2 * HD * E + mlp + comp),
        "logits": 2 * E * V,
    }
    if n_rec:
        token = 2 * E * 4 * HD + attn + 4 * S * HD + 2 * 2 * HD * E + mlp + comp
        reads = 2 if config.state_self_attention else 1  # attention outputs the state reads
        state = (2 * S * E * (2 + reads) * HD  # K_s, V_s, [Q_s,] Q2_s
                 + (4 * S * S * HD if config.state_self_attention else 0)  # S x S
                 + 4 * S * 2 * W * HD  # state cross-attention, S x 2W token keys
                 + 2 * S * reads * HD * E)  # state output projection
        if config.gate == "lstm":
            state += 2 * S * reads * HD * 2 * E
        if config.variant == "dual":
            state += S * mlp + (2 * S * E * 2 * E if config.gate == "lstm" else 0)
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: str, device: torch.device, max_n: int | None = None,
                budget_s: float = 1.0) -> dict:
    """Best FLOP/s of square matmuls of the given dtype, in both weight layouts (a @ b, and
    F.linear's a @ b.T, which the model's projections use: CPU bf16 fallbacks differ ~8x between
    them). The size doubles until one product takes about 50 ms (or max_n), so machines without
    fast kernels (bf16 on a CPU without AVX512-BF16 / AMX) are probed without minute-long
    products."""
    max_n = max_n or (8192 if device.type == "cuda" else 2048)
    dt = torch_dtype(dtype)
    n, best, best_n = 256, 0.0, 256
    while True:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        slowest = 0.0
        for op in (torch.matmul, F.linear):
            op(a, b)  # warm-up: kernel selection, page faults
            sync(device)
            times, t_start = [], time.perf_counter()
            while len(times) < 3 or (len(times) < 10 and
                                     time.perf_counter() - t_start < budget_s / 8):
                t0 = time.perf_counter()
                op(a, b)
                sync(device)
                times.append(time.perf_counter() - t0)
            rate = 2 * n ** 3 / min(times)  # best time: a peak, not a typical rate
            if rate > best:
                best, best_n = rate, n
            slowest = max(slowest, min(times))
        if n >= max_n or slowest > 0.05:
            break
        n *= 2
    return {"flops_per_s": best, "n": best_n}


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls have real kernels here (otherwise bf16 runs measure an emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# --------------------------------------------------------------------------- process


def cpu_seconds() -> float:
    return time.process_time()  # all threads of the process, nanosecond clock


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fmt(x, spec=",.0f", none="-"):
    return none if x is None else format(x, spec)
