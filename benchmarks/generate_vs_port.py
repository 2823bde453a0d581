"""Batch-1 generation, ours against the best-known port's own `generate`, in the same run.

    pip install --no-deps --target /tmp/portlib block-recurrent-transformer-pytorch==0.4.4 \\
        einops beartype
    python benchmarks/generate_vs_port.py --port-path /tmp/portlib --threads 1

Both models get the reference config (blockrecurrent.bench.run.REFERENCE_CONFIG: dim 256, depth 4,
4 x 64 heads, W = S = 128, max_seq_len 1024, recurrent layer 3), random weights, a prompt of
`--prompt` random tokens and `--new-tokens` new tokens. The port keeps no cache: every new token
re-runs its forward over everything generated so far in the segment, so its cost per token grows
with the prompt (it refuses prompts of max_seq_len or more). Ours prefills once and then runs its
cached single-token step. The two alternate in every round; tokens/s count the new tokens over
the whole call (prefill included, as a user waits for it), and the ratio is the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch
from bench_vs_port import load_port  # the script beside this one (its folder is on sys.path)

from blockrecurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from blockrecurrent.bench.run import REFERENCE_CONFIG
from blockrecurrent.generate.generation import generate


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port-path", help="folder holding block_recurrent_transformer_pytorch")
    ap.add_argument("--prompt", type=int, nargs="+", default=[16], metavar="N",
                    help="prompt lengths (each < max_seq_len - new tokens; default: 16)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Port = load_port(args.port_path)
    cfg = BlockRecurrentConfig(**REFERENCE_CONFIG)
    for n in args.prompt:
        if n < 1 or n + args.new_tokens > cfg.max_seq_len:
            ap.error(f"--prompt {n}: the port generates within one segment of "
                     f"{cfg.max_seq_len} tokens, prompt + new tokens must fit")
    torch.manual_seed(0)
    ours = BlockRecurrentTransformer(cfg).eval()
    port = Port(num_tokens=cfg.num_tokens, dim=cfg.dim, depth=cfg.depth, dim_head=cfg.dim_head,
                heads=cfg.heads, max_seq_len=cfg.max_seq_len, block_width=cfg.block_width,
                num_state_vectors=cfg.num_state_vectors, recurrent_layers=cfg.recurrent_layers,
                use_flash_attn=True).eval()
    new = args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {new} new tokens",
          file=sys.stderr)
    rows = []
    for n in args.prompt:
        prompt = torch.randint(0, cfg.num_tokens, (1, n))
        run_ours = functools.partial(generate, ours, prompt, new, do_sample=False)
        # The port's generate stops at `length` tokens in all, prompt included.
        run_port = functools.partial(port.generate, prompt, length=n + new)
        with torch.inference_mode():
            run_ours(), run_port()  # warm-up
            t_ours, t_port = [], []
            for rep in range(args.repeats):
                t_ours.append(timed(run_ours))
                t_port.append(timed(run_port))
                print(f"[prompt {n} {rep + 1}/{args.repeats}] ours {new / t_ours[-1]:,.1f} "
                      f"port {new / t_port[-1]:,.1f} tokens/s", file=sys.stderr, flush=True)
        rows.append(dict(prompt=n, new_tokens=new, ours=new / statistics.median(t_ours),
                         port=new / statistics.median(t_port),
                         speedup=statistics.median(p / o for o, p in zip(t_ours, t_port,
                                                                          strict=True))))
    print("\n| prompt | new tokens | ours tokens/s | port tokens/s | ours / port (median) |\n"
          "|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prompt']} | {r['new_tokens']} | {r['ours']:,.1f} | {r['port']:,.1f} | "
              f"{r['speedup']:.1f}x |")
    return rows


if __name__ == "__main__":
    main()
