"""Our model against the best-known PyTorch port on the same machine, in the same run.

    pip install --no-deps --target /tmp/portlib block-recurrent-transformer-pytorch==0.4.4 \\
        einops beartype
    python benchmarks/bench_vs_port.py --port-path /tmp/portlib --threads 1

The port's tokens/s measured at another time (or, for bf16, on other hardware) cannot be set
beside ours; on a shared machine only a ratio measured pass by pass means anything. Both models get
the reference config (blockrecurrent.bench.run.REFERENCE_CONFIG), batch 4, a 2048-token stream
fed segment by segment (max_seq_len = 1024), forward + cross-entropy + backward + AdamW step per
segment with memories and states carried, detached, between segments (the port returns them
detached); inference feeds the same segments under torch.inference_mode. The two run alternately
in every repeat; the reported ratio is the median of the per-pass ratios.

`--no-deps`: the port declares memorizing-transformers-pytorch, which it never imports and which
brings GPU wheels.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from blockrecurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from blockrecurrent.bench.run import REFERENCE_CONFIG, Runner


def port_stream(model, opt, tokens, n, segment, mode, dtype) -> float:
    """The port, fed like Runner.stream feeds ours; returns the wall seconds of the stream."""
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16"
           else contextlib.nullcontext())
    mems, states = [], []
    model.train(mode == "train")
    t0 = time.perf_counter()
    with contextlib.nullcontext() if mode == "train" else torch.inference_mode():
        for i in range(0, n, segment):
            with amp:
                if mode == "train":  # the port splits inputs and labels itself
                    loss, mems, states = model(tokens[:, i:i + segment + 1], xl_memories=mems,
                                               states=states, return_loss=True)
                else:
                    _, mems, states = model(tokens[:, i:i + segment], xl_memories=mems,
                                            states=states)
            if mode == "train":
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def load_port(port_path: str | None):
    """The port's model class, from `port_path` (a pip --target folder) or the environment.
    The port is a throwaway install beside this package, not one of its dependencies: its
    folder goes on sys.path for this process only (the package itself is imported as
    installed, `pip install -e .`)."""
    if port_path:
        sys.path.insert(0, port_path)  # the port's separate install, not this package
    try:
        from block_recurrent_transformer_pytorch import BlockRecurrentTransformer as Port
    except ImportError:
        sys.exit("the port is not installed: pip install --no-deps --target DIR "
                 "block-recurrent-transformer-pytorch==0.4.4 einops beartype, then --port-path DIR")
    return Port


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port-path", help="folder holding block_recurrent_transformer_pytorch")
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compile", action="store_true",
                    help="also run ours under torch.compile (same weights), interleaved with eager "
                         "and the port, to measure compiled against eager in the same run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Port = load_port(args.port_path)

    cfg = BlockRecurrentConfig(**REFERENCE_CONFIG)
    torch.manual_seed(0)
    ours = BlockRecurrentTransformer(cfg)
    runner = Runner("ours", ours, ours, torch.optim.AdamW(ours.parameters(), lr=1e-4),
                    cfg.max_seq_len)
    compiled = None
    if args.compile:
        torch.manual_seed(0)
        twin = BlockRecurrentTransformer(cfg)
        compiled = Runner("compiled", twin, torch.compile(twin),
                          torch.optim.AdamW(twin.parameters(), lr=1e-4), cfg.max_seq_len)
    port = Port(num_tokens=cfg.num_tokens, dim=cfg.dim, depth=cfg.depth, dim_head=cfg.dim_head,
                heads=cfg.heads, max_seq_len=cfg.max_seq_len, block_width=cfg.block_width,
                num_state_vectors=cfg.num_state_vectors, recurrent_layers=cfg.recurrent_layers,
                use_flash_attn=True)
    port_opt = torch.optim.AdamW(port.parameters(), lr=1e-4)
    n, b, seg = args.length, args.batch_size, cfg.max_seq_len
    if n % seg:
        sys.exit(f"--length must be a multiple of the segment {seg}: the port returns memories "
                 f"only for full segments")
    tokens = torch.randint(0, cfg.num_tokens, (b, n + 1))
    params = {"ours": sum(p.numel() for p in ours.parameters()),
              "port": sum(p.numel() for p in port.parameters())}
    print(f"params: ours {params['ours'] / 1e6:.2f}M, port {params['port'] / 1e6:.2f}M; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)

    rows = []
    for dtype in args.dtypes:
        for mode in args.modes:
            runner.stream(tokens, seg, mode, dtype)  # warm-up, allocates optimizer state
            port_stream(port, port_opt, tokens, seg, seg, mode, dtype)
            if compiled is not None:  # compiles every call shape of a whole stream
                t0 = time.perf_counter()
                compiled.stream(tokens, n, mode, dtype)
                print(f"[{mode} {dtype}] compile warm-up {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
            t_ours, t_port, t_comp = [], [], []
            for rep in range(args.repeats):
                t_ours.append(sum(runner.stream(tokens, n, mode, dtype)))
                t_port.append(port_stream(port, port_opt, tokens, n, seg, mode, dtype))
                if compiled is not None:
                    t_comp.append(sum(compiled.stream(tokens, n, mode, dtype)))
                print(f"[{mode} {dtype} {rep + 1}/{args.repeats}] ours {b * n / t_ours[-1]:,.0f} "
                      f"port {b * n / t_port[-1]:,.0f}" +
                      (f" compiled {b * n / t_comp[-1]:,.0f}" if t_comp else "") + " tokens/s",
                      file=sys.stderr, flush=True)
            rows.append(dict(mode=mode, dtype=dtype, ours=b * n / statistics.median(t_ours),
                             port=b * n / statistics.median(t_port),
                             speedup=statistics.median(
                                 p / o for o, p in zip(t_ours, t_port, strict=True))))
            if t_comp:
                rows[-1].update(compiled=b * n / statistics.median(t_comp),
                                compiled_over_eager=statistics.median(
                                    o / c for o, c in zip(t_ours, t_comp, strict=True)))
    comp = compiled is not None
    print("\n| mode | dtype | ours tokens/s | port tokens/s | ours / port (median of pairs) |" +
          (" compiled tokens/s | compiled / eager |" if comp else "") +
          "\n|---|---|---:|---:|---:|" + ("---:|---:|" if comp else ""))
    for r in rows:
        print(f"| {r['mode']} | {r['dtype']} | {r['ours']:,.0f} | {r['port']:,.0f} | "
              f"{r['speedup']:.2f}x |"
              + (f" {r['compiled']:,.0f} | {r['compiled_over_eager']:.2f}x |" if comp else ""))
    return {"rows": rows, "params": params}


if __name__ == "__main__":
    main()
