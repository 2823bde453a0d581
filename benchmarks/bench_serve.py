"""brt serve under load, and what a session costs: tokens/s and latency at 1, 8 and 32 concurrent
sessions against a server in its own process (the official openai client, streaming), and the
session file's size at several context lengths beside a full-attention transformer's KV cache.

    python benchmarks/bench_serve.py --preset small --concurrency 1 8 32 --new-tokens 32 \\
        --sizes 1024 65536 --size-presets tiny small --threads 1

Random weights (speed does not depend on them); the byte tokenizer. Each session first reads a
prompt of --prompt-tokens tokens (untimed), then every session asks at once for --new-tokens
more (timed): all sessions are at the same position in their blocks, so the server decodes them
as one batch. Latency is per request (time to the first streamed token, and to the last);
tokens/s is all new tokens over the wall time of the round. The same batches are also timed
without HTTP (serve.batching.step_together on rows in this process): the server's own work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.bench.machine import cpu_name
from blockrecurrent.generate.generation import prefill
from blockrecurrent.generate.session import Session, save_session


def session_sizes(preset_name: str, contexts: list[int], out_dir: Path) -> list[dict]:
    """The session file written after reading n random tokens, for each n, and the fp32 KV
    cache a transformer of the same depth and width holds at n tokens."""
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(preset(preset_name)).eval()
    cfg, rows = model.config, []
    for n in contexts:
        ids = torch.randint(0, cfg.num_tokens, (1, n))
        t0 = time.perf_counter()
        logits, mems, states = prefill(model, ids)
        seconds = time.perf_counter() - t0
        path = out_dir / f"{preset_name}-{n}.session"
        save_session(path, model, Session(mems, states, logits))
        kv = 2 * cfg.depth * n * cfg.heads * cfg.dim_head * 4
        rows.append(dict(preset=preset_name, context=n, cache_len=mems.cache_len,
                         session_bytes=path.stat().st_size, kv_cache_bytes=kv,
                         prefill_s=round(seconds, 2)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def batched_steps(preset_name: str, batches: list[int], prompt: int, steps: int) -> list[dict]:
    """The scheduler's work without HTTP: `batches` rows (prompts of `prompt` tokens) sampled
    and stepped together (serve.batching.step_together), ms per step and tokens/s."""
    from blockrecurrent.serve.batching import Row, step_together

    torch.manual_seed(0)
    model, out = BlockRecurrentTransformer(preset(preset_name)).eval(), []
    for b in batches:
        rows = [Row(*prefill(model, torch.randint(0, 256, (1, prompt))), remaining=steps + 1,
                    sampling=dict(do_sample=True, temperature=1.0)) for _ in range(b)]
        t0 = time.perf_counter()
        for _ in range(steps):
            for r in rows:
                r.sample()
            step_together(model, rows)
        wall = time.perf_counter() - t0
        out.append(dict(batch=b, ms_per_step=round(1e3 * wall / steps, 1),
                        tokens_per_s=round(b * steps / wall, 1)))
        print(json.dumps(out[-1]), flush=True)
    return out


def _child(args) -> None:
    """The server process: serve a random model of the preset, print its URL, run until stdin
    closes."""
    from blockrecurrent.data.tokenizer import ByteTokenizer
    from blockrecurrent.serve.server import build_app, start_in_thread

    torch.set_num_threads(args.threads)
    d = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    torch.manual_seed(0)
    BlockRecurrentTransformer(preset(args.preset)).save_pretrained(d / "model")
    ByteTokenizer().save(d / "model")
    srv = start_in_thread(build_app(d / "model", session_dir=d / "sessions", name="bench",
                                    max_tokens=4096, max_in_memory=256))
    print(srv.url, flush=True)
    sys.stdin.read()
    srv.stop()


def _ask(client, session: str, prompt: str, n: int, out: list, new: bool = False) -> None:
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(
            model="bench", prompt=prompt, max_tokens=n, temperature=1.0, stream=True,
            extra_body={"session": session, "new_session": new}):
        if chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:  # the last chunk's
            tokens = chunk.usage.completion_tokens
    out.append(dict(first=first or 0.0, total=time.perf_counter() - t0, tokens=tokens))


def _round(client, sessions: list[str], prompt: str, n: int, new: bool) -> tuple[list, float]:
    out: list[dict] = []
    threads = [threading.Thread(target=_ask, args=(client, s, prompt, n, out, new))
               for s in sessions]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def serve_load(args) -> list[dict]:
    import openai

    child = subprocess.Popen([sys.executable, __file__, "--child", "--preset", args.preset,
                              "--threads", str(args.threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = child.stdout.readline().strip()
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        rows, prompt = [], "a" * args.prompt_tokens
        for c in args.concurrency:
            names = [f"c{c}-{i}" for i in range(c)]
            _round(client, names, prompt, 0, new=True)  # read the prompts (untimed)
            out, wall = _round(client, names, "", args.new_tokens, new=False)
            tokens = sum(r["tokens"] for r in out)
            rows.append(dict(concurrency=c, tokens=tokens, wall_s=round(wall, 2),
                             tokens_per_s=round(tokens / wall, 1),
                             first_token_ms_median=round(1e3 * statistics.median(
                                 r["first"] for r in out), 1),
                             latency_s_median=round(statistics.median(r["total"] for r in out), 2),
                             latency_s_max=round(max(r["total"] for r in out), 2)))
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs="*", default=[1024, 65536])
    p.add_argument("--size-presets", nargs="*", default=["tiny", "small"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [r for name in args.size_presets
                 for r in session_sizes(name, args.sizes, Path(tmp))]
    steps = batched_steps(args.preset, args.concurrency, args.prompt_tokens + 1,
                          args.new_tokens) if args.concurrency else []
    load = serve_load(args) if args.concurrency else []
    result = dict(preset=args.preset, threads=args.threads, cpu=cpu_name(), sizes=sizes,
                  steps=steps, load=load)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
