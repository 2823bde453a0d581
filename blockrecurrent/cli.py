"""The `brt` command line: each subcommand is a thin wrapper over a plain function.

    brt train    [--config FILE] [--preset NAME] [--resume] [key=value ...]  -> train.train
    brt eval     CHECKPOINT [--data SRC] [--split val|test] ...     -> evaluate.evaluate_checkpoint
    brt generate CHECKPOINT [--prompt TEXT | --prompt-file FILE] ...  -> generation.generate_text
    brt compare  [--config FILE] [--preset NAME] [--out DIR] [key=value ...]  -> evaluate.compare
    brt bench    ...                                                          -> bench.main
    brt probe    [--kind keys|pairs] [--keys K ...] [--distances D ...] [key=value ...] -> probes
    brt run      [--out DIR] [--quick] [key=value ...]                        -> cli.main_job

Mistakes a user can make (a missing directory, an unknown option) print `error: <message>` and
exit with status 2; `brt --traceback ...` shows the full traceback instead. Heavy modules (torch,
the trainer) are imported inside the subcommands, so `brt --help` is quick.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROBE_DISTANCES = (2, 4, 6)  # the main job's recall probe, in blocks

# Errors that mean "the user asked for something impossible", not "the program is broken".
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError)


def _overrides(values: list[str]) -> list[str]:
    bad = [v for v in values if "=" not in v or v.startswith("=")]
    if bad:
        raise ValueError(f"settings must look like key=value (a training field) or "
                         f"model.key=value (a model field), got {bad}")
    return values


# --- subcommands -------------------------------------------------------------------------


def cmd_train(args) -> int:
    overrides = _overrides(args.overrides)
    from .train import load_train_config, train

    model_config, train_config = load_train_config(args.config, args.preset, overrides)
    summary = train(model_config, train_config, resume=args.resume)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import eval_table, evaluate_checkpoint, human_count

    out = args.out if args.out is not None else Path(args.checkpoint) / "eval"
    res = evaluate_checkpoint(
        args.checkpoint, data=args.data, split=args.split, text_field=args.text_field,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        cache_dir=args.cache_dir, batch_size=args.batch_size, segment_len=args.segment_len,
        dtype=args.dtype, max_docs=args.max_docs, max_tokens=args.max_tokens,
        device=args.device, out_dir=out, reset_state=args.reset_state,
        name=f"eval-{args.split}" + ("-state-reset" if args.reset_state != "carry" else ""))
    print(f"model: {args.checkpoint} ({human_count(res['params'])} parameters, "
          f"{human_count(res['non_embedding_params'])} non-embedding)")
    print(f"data: {res['data']!r}, {args.split} split: {res['documents']} documents, "
          f"{res['tokens']:,} tokens, {res['bytes']:,} bytes "
          f"({res['seconds']:.1f} s, {res['tokens_per_s']:,.0f} tokens/s)")
    print(eval_table(res))
    print(f"bits per byte: {res['bits_per_byte']:.4f}   bits per token: "
          f"{res['bits_per_token']:.4f}   (bits/byte per bucket ~ bits/token x "
          f"{1 / res['bytes_per_token']:.3f} tokens/byte)")
    print("wrote " + ", ".join(p for p in res["report"].values() if p))
    return 0


def cmd_generate(args) -> int:
    from .generation import generate_text

    generate_text(args.checkpoint, prompt=args.prompt, prompt_file=args.prompt_file,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device)
    return 0


def cmd_compare(args) -> int:
    overrides = _overrides(args.overrides)
    from .evaluate import compare

    res = compare(args.config, args.preset, overrides, args.out,
                  extra_layer=not args.no_extra_layer, eval_batch_size=args.eval_batch_size,
                  max_eval_tokens=args.max_eval_tokens)
    print(res["markdown"])
    print(f"wrote {args.out}/comparison.md, comparison.json, comparison.png")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    bench.main(args)
    return 0


def cmd_probe(args) -> int:
    from .probes import evaluate_saved, probe_table, run_probes, write_probe_report
    from .train import load_train_config

    # Model settings over the probe preset, parsed as the trainer parses model.key=value.
    config = load_train_config(preset="probe", overrides=[
        "model." + o.strip().removeprefix("model.") for o in _overrides(args.overrides)])[0]
    task = dict(kind=args.kind, num_keys=args.keys, distances=args.distances,
                queries=args.queries, lead=args.lead)
    if args.model is not None:
        rows = evaluate_saved(args.model, **task)
    else:
        rows = run_probes(config, **task, models=args.models,
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seeds=args.seeds,
                          save_dir=Path(args.out) / "models" if args.save_models else None)
    paths = write_probe_report(rows, args.out, title=f"recall probe ({args.kind})")
    print(probe_table(rows, markdown=False))
    print("wrote " + ", ".join(p for p in paths.values() if p))
    return 0


def cmd_run(args) -> int:
    main_job(args.out, quick=args.quick, config=args.config, overrides=_overrides(args.overrides),
             max_eval_tokens=args.max_eval_tokens)
    return 0


# --- the main job ------------------------------------------------------------------------


def _default_config() -> str | None:
    """configs/small.toml from the working directory or the source checkout, if there is one."""
    for base in (Path(), Path(__file__).resolve().parent.parent):  # relative to cwd first
        path = base / "configs" / "small.toml"
        if path.is_file():
            return str(path)
    return None


# --quick: a smoke test of the whole pipeline in a minute or two (numbers mean nothing).
QUICK_OVERRIDES = ("max_steps=10", "warmup_steps=1", "eval_interval=0", "eval_tokens=4096",
                   "save_interval=0", "log_interval=1")
# ~100k tokens: the first test files by name, one of them 52k tokens long, so every position
# bucket up to [16k, inf) gets tokens; about 1 minute on 2 idle cores.
QUICK_EVAL_TOKENS, EVAL_TOKENS = 4_000, 100_000
SAMPLE_PROMPT_CHARS = 400


def _sample_prompt(docs) -> tuple[str, str]:
    """The start of the first held-out document with some length, cut at a line end."""
    doc = next((d for d in docs if len(d.text) >= 2 * SAMPLE_PROMPT_CHARS), docs[0])
    text = doc.text[:SAMPLE_PROMPT_CHARS]
    cut = text.rfind("\n")
    return doc.name, text[:cut + 1] if cut > 0 else text


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main_job(out_dir: str | os.PathLike = "report", *, quick: bool = False,
             config: str | None = None, overrides=(), max_eval_tokens: int | None = None,
             sample_tokens: int | None = None) -> dict:
    """The README's main job, end to end on the built-in corpus (the CPython standard library):
    train the small recurrent model (configs/small.toml, else the "small" preset), evaluate it on
    the held-out test documents by position, sample a continuation of a held-out document, and
    write out_dir/README.md with the plots, metrics and tables beside it. Training goes to
    out_dir/train (unless `out_dir=` is overridden); a finished run there with the same
    settings is reused and an interrupted one resumed, so rerunning the job is cheap."""
    import torch

    from .data import load_documents, load_tokenizer, split_documents
    from .config import preset
    from .evaluate import (ablation_table, auto_batch_size, check_reusable, eval_device,
                           eval_table, evaluate, load_heldout, state_ablation, train_or_reuse,
                           write_eval_report)
    from .probes import probe_table, run_probes, write_probe_report
    from .generation import generate_text
    from .model import BlockRecurrentTransformer
    from .train import load_train_config

    out = Path(out_dir)
    overrides = list(overrides)
    config = config if config is not None else _default_config()
    if quick:
        overrides = [*QUICK_OVERRIDES, *overrides]
    if not any(o.split("=", 1)[0].strip() == "out_dir" for o in overrides):
        overrides.append(f"out_dir={out / 'train'}")
    if max_eval_tokens is None:
        max_eval_tokens = QUICK_EVAL_TOKENS if quick else EVAL_TOKENS
    sample_tokens = sample_tokens if sample_tokens is not None else (32 if quick else 256)
    # Every check before any work: settings, an output directory holding another run.
    model_config, tc = load_train_config(config, None, overrides)
    reused = check_reusable(model_config, tc)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _warn_if_busy()

    print(f"[1/5] training ({config or 'preset small'}) -> {tc.out_dir}", file=sys.stderr)
    summary = train_or_reuse(model_config, tc, "main job")
    train_dir = Path(tc.out_dir)
    model_dir = Path(summary["model_dir"])

    print("[2/5] evaluating on the held-out test documents", file=sys.stderr)
    device = eval_device(tc)
    model = BlockRecurrentTransformer.from_pretrained(model_dir, map_location=device)
    tokenizer = load_tokenizer(model_dir)
    corpus = load_heldout(tc.data, tokenizer, "test", text_field=tc.text_field,
                          cache_dir=tc.cache_dir or None)
    batch = auto_batch_size(corpus, device, max_eval_tokens)
    results = evaluate(model, corpus, batch_size=batch, max_tokens=max_eval_tokens,
                       device=device, desc="eval test")
    results.update(model_dir=str(model_dir), data=tc.data, split="test")
    results["report"] = write_eval_report(results, out, "eval-test")

    # Does the state help? The same model with its state reset at every segment (the window's
    # cache still carried), and a short recall probe of the cell against Slide.
    print("[3/5] the state ablation: the same evaluation, state reset at every segment",
          file=sys.stderr)
    ablation = state_ablation(model, corpus, carry=results, batch_size=batch,
                              max_tokens=max_eval_tokens, device=device)
    print("[4/5] recall probe: the recurrent cell against Slide", file=sys.stderr)
    probe_rows = run_probes(preset("probe"), num_keys=(1,),
                            distances=PROBE_DISTANCES[:1] if quick else PROBE_DISTANCES,
                            steps=20 if quick else 300, log=None)
    probe_paths = write_probe_report(probe_rows, out / "probe", title="recall probe, K=1")

    print("[5/5] sampling a continuation of a held-out document", file=sys.stderr)
    test_docs = split_documents(load_documents(tc.data, tc.text_field))["test"]
    prompt_doc, prompt = _sample_prompt(test_docs)
    sample = generate_text(model_dir, prompt=prompt, max_new_tokens=sample_tokens,
                           temperature=0.8, top_p=0.95, seed=0, out=io.StringIO(),
                           err=io.StringIO(), device=device)
    print(f"--- sample (prompt from {prompt_doc}) ---\n{prompt}{sample['text']}\n---")

    for name in ("loss.png", "metrics.jsonl"):
        if (train_dir / name).is_file() and train_dir.resolve() != out.resolve():
            shutil.copy2(train_dir / name, out / name)
    job = {"config_file": config, "overrides": overrides, "quick": quick, "reused": reused,
           "model_config": model.config.to_dict(), "train_config": tc.to_dict(),
           "train_summary": summary, "eval": results, "sample": {
               "prompt_document": prompt_doc, "prompt": prompt, **sample},
           "params": model.num_params(non_embedding=False),
           "non_embedding_params": model.num_params(),
           "torch_threads": torch.get_num_threads(), "device": device,
           "state_ablation": ablation["gain"], "probe": probe_rows,
           "probe_report": probe_paths,
           "wall_seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(job, indent=2, default=str) + "\n")
    readme = _report_markdown(job, out, train_dir, model_dir, eval_table(results, markdown=True),
                              ablation_table(ablation, markdown=True),
                              probe_table(probe_rows, markdown=True))
    (out / "README.md").write_text(readme)
    print(eval_table(results))
    print(f"test bits per byte: {results['bits_per_byte']:.4f} over {results['documents']} "
          f"documents ({results['tokens']:,} tokens); final train loss "
          f"{summary.get('train_loss') or float('nan'):.4f}, val bits per byte "
          f"{summary.get('val_bpb') or float('nan'):.4f}")
    print(f"wrote {out / 'README.md'} ({job['wall_seconds'] / 60:.1f} min)")
    return job


def _warn_if_busy() -> None:
    """With other work on every core, torch's threads wait on each other at each operation:
    on a shared 2-core machine one thread ran the small model 2x (a tiny one 50x) faster."""
    import torch

    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return
    if torch.get_num_threads() > 1 and load >= (os.cpu_count() or 1) - 0.5:
        print(f"note: the machine is busy (load {load:.1f} on {os.cpu_count()} CPUs); if this "
              f"runs slowly, try --threads 1", file=sys.stderr)


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def _report_markdown(job: dict, out: Path, train_dir: Path, model_dir: Path, table: str,
                     ablation: str, probe: str) -> str:
    from .evaluate import human_count

    mc, tc, s, ev, sample = (job["model_config"], job["train_config"], job["train_summary"],
                             job["eval"], job["sample"])
    show = lambda v, d=4: "-" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)
    rows = lambda pairs: "\n".join(f"| {k} | {show(v)} |" for k, v in pairs
                                    if isinstance(v, (int, float, str, bool, list)) or v is None)
    model_keys = ("num_tokens", "dim", "depth", "heads", "dim_head", "block_width",
                  "num_state_vectors", "max_seq_len", "recurrent_layers", "gate", "variant")
    plots = [f"![training and validation loss]({name})" for name in ("loss.png",)
             if (out / name).is_file()]
    if ev["report"].get("png"):
        plots.append(f"![test loss by position]({Path(ev['report']['png']).name})")
    buckets = [b for b in ev["buckets"] if b["bits_per_token"] is not None]
    trend = ""
    if len(buckets) > 1:
        trend = (f"From the first bucket to the last, bits per token go from "
                 f"{buckets[0]['bits_per_token']:.3f} ({buckets[0]['label']}) to "
                 f"{buckets[-1]['bits_per_token']:.3f} ({buckets[-1]['label']}): the lower the "
                 f"late-position loss, the more the model gains from the context it has read.")
    text = sample["prompt"] + sample["text"]
    fence = "````" if "```" in text else "```"
    train_s = s.get("elapsed_s") or 0.0
    cmd = "brt run" + (" --quick" if job["quick"] else "")
    reused = " (training reused from an earlier run)" if job["reused"] else ""
    return f"""# Block-Recurrent Transformer: main job report

`{cmd}`, {datetime.datetime.now().isoformat(timespec="seconds")}; commit
{_git_commit() or "unknown"}, Python {platform.python_version()}, torch on {job["device"]}
(threads: {job["torch_threads"]}, CPUs: {os.cpu_count()}). Wall time of the job:
{job["wall_seconds"] / 60:.1f} min{reused}.
{"**Quick mode: a smoke test of the pipeline; the numbers mean nothing.**" if job["quick"] else ""}

| result | value |
|---|---|
| test bits per byte ({ev["documents"]} documents, {ev["tokens"]:,} tokens) | \
**{ev["bits_per_byte"]:.4f}** |
| test bits per token | {ev["bits_per_token"]:.4f} |
| validation bits per byte (trainer, step {show(s.get("evaluated_at"))}) | \
{show(s.get("val_bpb"))} |
| final training loss (nats / token) | {show(s.get("train_loss"))} |
| parameters | {human_count(job["params"])} ({job["non_embedding_params"]:,} without embeddings) |
| training | {show(s.get("step"))} steps, {s.get("tokens_seen") or 0:,} tokens, \
{train_s / 60:.1f} min |

Corpus: `{tc.get("data")}` (the built-in default: the `.py` files of the CPython standard
library). Whole documents go to train/val/test by a hash of their names, so no test file was
seen in training.

## Loss by position in the document (held-out test documents)

Each document is read once from its start, segment by segment, with the block memories and the
recurrent state carried across segments; evaluated in {ev["seconds"]:.0f} s
({ev["tokens_per_s"]:,.0f} tokens/s, batch {ev["batch_size"]}). Positions count the tokens
before the predicted one. Per-bucket bits per byte are bits per token x tokens per byte of
the whole set (exact for the byte tokenizer); empty buckets show n/a.

{table}

{trend}

{chr(10).join(plots)}

## Does the state help?

The same model and documents, evaluated once more with the recurrent state reset to its learned
initial value at the start of every segment ({mc.get("max_seq_len")} tokens) while the block
caches still carry the sliding window across segments. The gain (state reset minus state
carried, in bits per token; positive: the state helps) is what the state contributes at each
position beyond what the window sees:

{ablation}

A recall probe of the cell itself (`brt probe`): fresh 2-layer models (dim 64, W = S = 16)
trained for {job["probe"][0]["steps"]} steps to recall one key placed d blocks before the
question, after filler; "slide" has no recurrent layer ("(w)": the key is within its windows'
reach). Chance is {job["probe"][0]["chance"]:.3f}.

{probe}

{"![recall probe](probe/probe.png)" if job["probe_report"].get("png") else ""}

## Sample

The first {len(sample["prompt"])} characters of the held-out file `{sample["prompt_document"]}`,
then {sample["new_tokens"]} generated tokens (temperature 0.8, top-p 0.95, seed 0;
{show(sample.get("decode_tokens_per_s"), 1)} tokens/s decoding):

{fence}python
{text}
{fence}

## Model

Config file: `{job["config_file"] or "none (the small preset)"}`.

| setting | value |
|---|---|
{rows((k, mc[k]) for k in model_keys if k in mc)}

## Training

| setting | value |
|---|---|
{rows(tc.items())}

Trainer summary:

| quantity | value |
|---|---|
{rows(s.items())}

## Files

- `{_rel(model_dir, out)}/`: the trained model (config.json, model.safetensors, tokenizer). Try
  `brt generate {_rel(model_dir, Path.cwd())} --prompt "def "` or
  `brt eval {_rel(model_dir, Path.cwd())}`.
- `metrics.jsonl`, `loss.png`: training metrics and loss curves (from `{_rel(train_dir, out)}/`).
- `eval-test.json`, `eval-test.png`: the evaluation above, per document included.
- `results.json`: everything in this report, machine-readable.
"""


# --- the parser --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_Formatter = argparse.HelpFormatter


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The `brt` parser. with_bench=False leaves out bench's own options (they need torch)."""
    parser = argparse.ArgumentParser(
        prog="brt", formatter_class=_Formatter,
        description="The Block-Recurrent Transformer (Hutchins et al. 2022): train, evaluate, "
                    "generate, compare against baselines, benchmark.",
        epilog="Start with `brt run` (the main job) or `brt <command> --help`.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of errors instead of a one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compute = argparse.ArgumentParser(add_help=False)  # options of the commands that compute
    compute.add_argument("--threads", type=_positive_int, default=None,
                         help="CPU threads for torch (default: torch's choice, one per core); "
                              "on a busy machine 1 can be much faster")

    def add(name, func, help, description=None, threads=True):
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=_Formatter, parents=[compute] if threads else [])
        p.set_defaults(func=func)
        return p

    def train_options(p):
        from .config import PRESETS

        p.add_argument("--config", metavar="FILE",
                       help="config file (TOML or YAML) with [model] and [train] sections, "
                            "e.g. configs/small.toml")
        p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="model preset to start from (default: the config file's, else small)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override a training field (e.g. max_steps=200) or a model field "
                            "(e.g. model.depth=6)")

    p = add("train", cmd_train, "train a model",
            "Train a model; the final model is exported to OUT_DIR/model, checkpoints to "
            "OUT_DIR/checkpoints, metrics to OUT_DIR/metrics.jsonl.")
    train_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in out_dir")

    p = add("eval", cmd_eval, "evaluate a saved model on held-out documents",
            "Bits per byte and bits per token of a saved model on the held-out documents of a "
            "corpus, overall and by position in the document; writes JSON and a PNG plot.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="model directory: config.json, model.safetensors and tokenizer files "
                        "(e.g. runs/small/model)")
    p.add_argument("--data", default=None,
                   help="corpus: 'stdlib', a .jsonl file, a directory or a glob pattern "
                        "(default: the training run's, read from its trainer.json, else stdlib)")
    p.add_argument("--text-field", default=None,
                   help="text field of .jsonl records (default: the training run's, else text)")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="held-out split to evaluate (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents in the val split, as in training "
                        "(default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.05,
                   help="fraction of documents in the test split, as in training "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="documents read side by side (default: %(default)s)")
    p.add_argument("--segment-len", type=_positive_int, default=None,
                   help="tokens per model call (default: the model's max_seq_len)")
    p.add_argument("--max-docs", type=_positive_int, default=None,
                   help="evaluate only the first N documents of the split")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="evaluate only as many whole documents as fit in N tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="autocast dtype (default: the model's own, float32)")
    p.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--cache-dir", default="data_cache",
                   help="directory for the tokenized held-out documents (default: %(default)s)")
    p.add_argument("--reset-state", choices=("carry", "every-segment"), default="carry",
                   help="carry the recurrent state across segments (default), or reset it to "
                        "the initial state at every segment (the state ablation; the window's "
                        "cache still carries)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write eval-<split>.json and .png (default: CHECKPOINT/eval)")

    p = add("generate", cmd_generate, "continue a prompt with a saved model",
            "Print the continuation of a prompt as it is generated (speeds go to stderr). "
            "Without a prompt, the model writes a document from its start.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model directory (see brt eval)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompt", help="prompt text, read as the start of a document")
    which.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="stop after this many new tokens, or when the model starts a new document "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 picks the most likely token, greedy "
                        "(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens holding this much "
                        "probability, nucleus sampling (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    p.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu or cuda (default: %(default)s)")

    p = add("compare", cmd_compare, "train and compare the recurrent model with Slide and XL",
            "Train the recurrent model, Slide at the same depth (the ablation of the state), "
            "Slide with one more layer and XL from one config at equal training tokens and "
            "optimizer steps, evaluate all on the same held-out documents (longest first), add "
            "the recurrent model's state ablation, and write comparison.md, comparison.json "
            "and comparison.png.")
    train_options(p)
    p.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="output directory, one sub-directory per model (default: %(default)s)")
    p.add_argument("--no-extra-layer", action="store_true",
                   help="leave out Slide with one more layer (the paper's Slide:13L, matching "
                        "the recurrent cell's parameters) and give XL the same depth")
    p.add_argument("--eval-batch-size", type=_positive_int, default=None,
                   help="documents read side by side in evaluation (default: 8 on a GPU; on a "
                        "CPU the number that leaves the least padding)")
    p.add_argument("--max-eval-tokens", type=_positive_int, default=None,
                   help="evaluate only as many whole held-out documents as fit in N tokens")

    p = add("bench", cmd_bench, "benchmark throughput and memory against the baselines",
            "Throughput, memory and FLOP utilisation of the model and its Slide and XL "
            "baselines (see blockrecurrent/bench.py).", threads=False)  # bench has --threads
    if with_bench:
        try:
            from . import bench
        except ImportError as err:  # keep the other commands working
            def unavailable(args, err=err):
                raise ImportError(f"brt bench is unavailable: {err}")
            p.set_defaults(func=unavailable)
        else:
            bench.add_arguments(p)

    p = add("probe", cmd_probe, "long-range recall probes: the recurrent model against Slide",
            "Train the recurrent model and Slide (no recurrent layer) from scratch on synthetic "
            "recall tasks (keys placed d blocks before the questions, after filler) and print "
            "accuracy by distance and number of keys; writes probe.json, probe.md, probe.png. "
            "key=value settings change the probe model (default: 2 layers, dim 64, W = S = 16).")
    p.add_argument("--kind", choices=("keys", "pairs"), default="keys",
                   help="keys: recall K keys in order; pairs: K key->value pairs, questions "
                        "key -> value (default: %(default)s)")
    p.add_argument("--keys", type=_positive_int, nargs="+", default=[1, 2, 4], metavar="K",
                   help="numbers of keys (or pairs) to store (default: 1 2 4)")
    p.add_argument("--distances", type=_positive_int, nargs="+", default=[1, 2, 3, 4, 5, 6],
                   metavar="D", help="blocks from the keys to the questions (default: 1-6)")
    p.add_argument("--queries", type=_positive_int, default=1,
                   help="pairs: questions at the end (default: %(default)s)")
    p.add_argument("--lead", type=int, default=2,
                   help="filler blocks before the keys (default: %(default)s)")
    p.add_argument("--models", nargs="+", choices=("recurrent", "slide"),
                   default=["recurrent", "slide"], help="models to train (default: both)")
    p.add_argument("--steps", type=_positive_int, default=300,
                   help="training steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: 2e-3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="evaluate this saved model instead of training new ones")
    p.add_argument("--save-models", action="store_true",
                   help="save every trained model under OUT/models/")
    p.add_argument("--out", default="runs/probe", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="probe model settings, e.g. gate=lstm num_state_vectors=32")

    p = add("run", cmd_run, "the main job: train, evaluate and sample; write a report",
            "Train the small model on the built-in corpus (the CPython standard library), "
            "evaluate it on held-out documents by position, sample a continuation, and write "
            "a report folder (README.md, plots, metrics).")
    p.add_argument("--out", default="report", metavar="DIR",
                   help="report directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of the whole pipeline in a minute or two (a few training "
                        "steps, a small evaluation)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="training config file (default: configs/small.toml if present, else "
                        "the 'small' preset)")
    p.add_argument("--max-eval-tokens", type=_positive_int, default=None,
                   help=f"evaluate only as many whole test documents as fit in N tokens "
                        f"(default {EVAL_TOKENS:,}; --quick: {QUICK_EVAL_TOKENS:,})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a training field or a model field (model.key=value)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `brt` console script -> exit status (0 ok, 2 user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_bench="bench" in argv)  # bench imports torch: only when asked
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0) or a bad option (2, after argparse's message)
        return exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 2
    try:
        if getattr(args, "threads", None) and args.command != "bench":
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
