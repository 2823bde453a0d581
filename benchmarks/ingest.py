"""Ingest at the paper's scale (issue 33): PG19-shaped corpora (documents of about 400 KB in
train/, validation/ and test/ folders, made from shuffled concatenations of the standard
library's files) of the given sizes are built under --root, streamed into token stores with the
byte tokenizer (blockrecurrent.data.ingest), and `brt train` is timed from its start to its
first step with the store built. Each measurement runs in a fresh process; the corpora and stores
are deleted afterwards unless --keep.

    .venv/bin/python benchmarks/ingest.py --sizes 100 1000 --root /tmp/brt-ingest

Reports per size: ingest MB/s (corpus bytes / wall seconds; the files were just written, so
they are read from the page cache) and MB per CPU-second (user + system: steadier than the wall
time on a shared machine), peak resident memory of the ingest process (ru_maxrss) and
its resident memory after the imports, the store's size on disk, the time to find a built store
again (stat check + memory map), and the time from `brt train` to its first step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOC_BYTES = 400_000
HELD_OUT = 0.01  # of the documents, each for validation/ and test/ (at least 2)


def make_corpus(root: Path, megabytes: int, seed: int = 0) -> int:
    """Write the corpus; returns its bytes."""
    from blockrecurrent.data.corpus import iter_stdlib

    texts = [d.text for d in iter_stdlib() if d.text]
    rng = random.Random(seed)
    n_docs = max(6, megabytes * 1_000_000 // DOC_BYTES)
    held = max(2, int(n_docs * HELD_OUT))
    total = 0
    for i in range(n_docs):
        split = "validation" if i < held else "test" if i < 2 * held else "train"
        parts, size = [], 0
        while size < DOC_BYTES:
            t = texts[rng.randrange(len(texts))]
            parts.append(t)
            size += len(t)
        text = "".join(parts)[:DOC_BYTES]
        path = root / split / f"book{i:06d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the ingest: no write-back during it
        total += path.stat().st_size
    return total


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child_ingest(source: str, cache: str) -> None:
    """In a fresh process: ingest, print one JSON line."""
    from blockrecurrent.data.ingest import ingest
    from blockrecurrent.data.tokenizer import ByteTokenizer

    base = _rss_kib()
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    stores = ingest(source, ByteTokenizer(), cache)
    seconds, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "base_rss_mib": base / 1024,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "bytes": sum(s.total_bytes for s in stores.values() if s is not None),
                      "tokens": sum(s.total_tokens for s in stores.values() if s is not None)}))


def run_child(source: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child-ingest", str(source), str(cache)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_to_first_step(source: Path, cache: Path, out_dir: Path, timeout: float = 600) -> float:
    """Seconds from starting `brt train` (tiny model, 1 thread) to its first metrics record."""
    brt = Path(sys.executable).with_name("brt")
    cmd = [str(brt), "train", "--threads", "1", "--preset", "tiny", f"data={source}",
           f"cache_dir={cache}", f"out_dir={out_dir}", "max_steps=2", "log_interval=1",
           "eval_interval=0", "save_interval=0", "eval_tokens=0"]
    metrics = out_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - t0 < timeout:
            if metrics.is_file() and metrics.read_text().strip():
                return time.perf_counter() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"brt train exited ({proc.returncode}): "
                                   f"{proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError("brt train did not reach its first step in time")
    finally:
        proc.kill()
        proc.wait()


def du_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def bench(size: int, root: Path, keep: bool, cache_root: Path | None = None) -> dict:
    source, cache = root / f"pg19-shaped-{size}mb", (cache_root or root) / f"cache-{size}mb"
    for p in (source, cache, root / f"out-{size}mb"):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = make_corpus(source, size)
    made = time.perf_counter() - t0
    try:
        built = run_child(source, cache)
        found = run_child(source, cache)  # the store is there: stat check and memory map
        start = time_to_first_step(source, cache, root / f"out-{size}mb")
        return {"size_mb": size, "corpus_bytes": nbytes, "docs_made_s": round(made, 1),
                "ingest_s": round(built["seconds"], 2),
                "ingest_mb_s": round(nbytes / 1e6 / built["seconds"], 1),
                "ingest_cpu_s": round(built["cpu_s"], 2),
                "ingest_mb_per_cpu_s": round(nbytes / 1e6 / built["cpu_s"], 1),
                "load_average": round(os.getloadavg()[0], 1),
                "base_rss_mib": round(built["base_rss_mib"], 1),
                "peak_rss_mib": round(built["peak_rss_mib"], 1),
                "store_mib": round(du_mib(cache), 1), "tokens": built["tokens"],
                "reopen_s": round(found["seconds"], 3),
                "first_step_s": round(start, 2)}
    finally:
        if not keep:
            for p in (source, cache, root / f"out-{size}mb"):
                shutil.rmtree(p, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes, MB")
    ap.add_argument("--root", type=Path, default=Path("/tmp/brt-ingest"))
    ap.add_argument("--keep", action="store_true", help="keep the corpora and stores")
    ap.add_argument("--cache-root", type=Path, help="where the stores go (default --root); "
                    "e.g. /dev/shm to measure the pipeline without the disk's write speed")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--child-ingest", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_ingest:
        return child_ingest(*args.child_ingest)
    from blockrecurrent.bench.machine import cpu_name  # here: the ingest child imports no torch

    args.root.mkdir(parents=True, exist_ok=True)
    results = {"cpu": cpu_name(), "python": sys.version.split()[0], "results": [],
               "cache_root": str(args.cache_root or args.root)}
    print(f"CPU: {results['cpu']}", file=sys.stderr)
    for size in args.sizes:
        r = bench(size, args.root, args.keep, args.cache_root)
        results["results"].append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    print("| corpus | ingest s | ingest MB/s | MB per CPU-s | RSS after imports MiB | peak RSS "
          "MiB | store MiB | reopen s | brt train to first step s | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["results"]:
        print(f"| {r['size_mb']} MB | {r['ingest_s']} | {r['ingest_mb_s']} | "
              f"{r['ingest_mb_per_cpu_s']} | {r['base_rss_mib']} | {r['peak_rss_mib']} | "
              f"{r['store_mib']} | {r['reopen_s']} | {r['first_step_s']} | "
              f"{r['load_average']} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
