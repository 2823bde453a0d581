"""The main job (`brt run`, `bash scripts/main.sh`): train, evaluate, ablate the state, probe
recall, sample, and write a report, end to end on the built-in corpus. The report's text is the
package's templates/report.md, filled with values that the functions at the end compute.

    job = main_job(quick=True)      # report-quick/README.md, results.json, plots
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import shutil
import string
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

PROBE_DISTANCES = (2, 4, 6)  # the main job's recall probe, in blocks


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


def main_job(out_dir: str | os.PathLike | None = None, *, quick: bool = False,
             config: str | None = None, overrides=(), max_eval_tokens: int | None = None,
             sample_tokens: int | None = None) -> dict:
    """The README's main job, end to end on the built-in corpus (the CPython standard library):
    train the small recurrent model (configs/small.toml, else the "small" preset), evaluate it on
    the held-out test documents by position, sample a continuation of a held-out document, and
    write out_dir/README.md with the plots, metrics and tables beside it (default: report, or
    report-quick with quick). Training goes to out_dir/train (unless `out_dir=` is overridden);
    a finished run there with the same settings is reused and an interrupted one resumed, so
    rerunning the job is cheap; one with other settings is moved aside to out_dir/train-previous
    (where out_dir= is not given)."""
    import torch

    from .evaluate.compare import train_or_reuse

    # The quick job has its own folder: its finished run would block the full job's in report/.
    out = Path(out_dir if out_dir is not None else "report-quick" if quick else "report")
    config = config if config is not None else _default_config()
    own_dir = not any(o.split("=", 1)[0].strip() == "out_dir" for o in overrides)
    overrides = _job_overrides(overrides, quick, out)
    if max_eval_tokens is None:
        max_eval_tokens = QUICK_EVAL_TOKENS if quick else EVAL_TOKENS
    sample_tokens = sample_tokens if sample_tokens is not None else (32 if quick else 256)
    model_config, tc, reused = _check_settings(config, overrides, own_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _warn_if_busy()

    print(f"[1/5] training ({config or 'preset small'}) -> {tc.out_dir}", file=sys.stderr)
    summary = train_or_reuse(model_config, tc, "main job")
    train_dir = Path(tc.out_dir)
    model_dir = Path(summary["model_dir"])

    print("[2/5] evaluating on the held-out test documents", file=sys.stderr)
    model, corpus, device, batch, results = _evaluate_test(model_dir, tc, out, max_eval_tokens)

    # Does the state help? The same model with its state reset at every segment (the window's
    # cache still carried), and a short recall probe of the cell against Slide.
    ablation = _ablation(model, corpus, results, batch, max_eval_tokens, device)
    probe_rows, probe_paths = _probe(out, quick)

    print("[5/5] sampling a continuation of a held-out document", file=sys.stderr)
    prompt_doc, prompt, sample = _sample(tc, model_dir, sample_tokens, device)

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
    _write_job(job, out, train_dir, model_dir, ablation)
    return job


def _check_settings(config, overrides: list[str], own_dir: bool):
    """Every check before any work: settings, an output directory holding another run ->
    (model config, train config, whether a finished run is reused)."""
    from .evaluate.compare import check_reusable, finished_run_diff
    from .train.settings import load_train_config

    model_config, tc = load_train_config(config, None, overrides)
    if own_dir and finished_run_diff(model_config, tc):  # the job's own folder: keep, not refuse
        aside = _move_aside(Path(tc.out_dir))
        print(f"note: {tc.out_dir} held a finished run with other settings; moved it to {aside}",
              file=sys.stderr)
    return model_config, tc, check_reusable(model_config, tc)


def _ablation(model, corpus, results: dict, batch: int, max_eval_tokens: int, device) -> dict:
    """The test evaluation again with the state reset at every segment (state_ablation)."""
    from .evaluate.evaluation import state_ablation

    print("[3/5] the state ablation: the same evaluation, state reset at every segment",
          file=sys.stderr)
    return state_ablation(model, corpus, carry=results, batch_size=batch,
                          max_tokens=max_eval_tokens, device=device)


def _probe(out: Path, quick: bool) -> tuple[list, dict]:
    """A short recall probe of the cell against Slide, its report in out/probe."""
    from .evaluate.probes import run_probes, write_probe_report
    from .model.config import preset

    print("[4/5] recall probe: the recurrent cell against Slide", file=sys.stderr)
    rows = run_probes(preset("probe"), num_keys=(1,),
                      distances=PROBE_DISTANCES[:1] if quick else PROBE_DISTANCES,
                      steps=20 if quick else 300, log=None)
    return rows, write_probe_report(rows, out / "probe", title="recall probe, K=1")


def _move_aside(path: Path) -> Path:
    """Rename path to the first free path-previous, path-previous-2, ... beside it."""
    n = 1
    while True:
        aside = path.with_name(f"{path.name}-previous" + (f"-{n}" if n > 1 else ""))
        if not aside.exists():
            os.replace(path, aside)
            return aside
        n += 1


def _job_overrides(overrides, quick: bool, out: Path) -> list[str]:
    """The training settings of the job: the quick ones first, and out_dir=out/train unless
    out_dir is given."""
    overrides = list(overrides)
    if quick:
        overrides = [*QUICK_OVERRIDES, *overrides]
    if not any(o.split("=", 1)[0].strip() == "out_dir" for o in overrides):
        overrides.append(f"out_dir={out / 'train'}")
    return overrides


def _evaluate_test(model_dir: Path, tc, out: Path, max_eval_tokens: int):
    """The trained model on the held-out test documents, eval-test.json/.png written ->
    (model, corpus, device, batch size, results)."""
    from .data.tokenizer import load_tokenizer
    from .evaluate.compare import eval_device
    from .evaluate.evaluation import auto_batch_size, evaluate
    from .evaluate.heldout import load_heldout
    from .evaluate.report import write_eval_report
    from .model.transformer import BlockRecurrentTransformer

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
    return model, corpus, device, batch, results


def _sample(tc, model_dir: Path, sample_tokens: int, device) -> tuple[str, str, dict]:
    """A continuation of the start of a held-out document -> (document, prompt, sample)."""
    from .data.splits import load_splits
    from .generate.text import generate_text

    test_docs = load_splits(tc.data, tc.text_field)["test"]  # the corpus's own split if any
    prompt_doc, prompt = _sample_prompt(test_docs)
    sample = generate_text(model_dir, prompt=prompt, max_new_tokens=sample_tokens,
                           temperature=0.8, top_p=0.95, seed=0, out=io.StringIO(),
                           err=io.StringIO(), device=device)
    print(f"--- sample (prompt from {prompt_doc}) ---\n{prompt}{sample['text']}\n---")
    return prompt_doc, prompt, sample


def _write_job(job: dict, out: Path, train_dir: Path, model_dir: Path, ablation: dict) -> None:
    """loss.png and metrics.jsonl copied from training, out/results.json and out/README.md,
    and the summary lines on stdout."""
    from .evaluate.probes import probe_table
    from .evaluate.report import ablation_table, count_of, eval_table

    for name in ("loss.png", "metrics.jsonl"):
        if (train_dir / name).is_file() and train_dir.resolve() != out.resolve():
            shutil.copy2(train_dir / name, out / name)
    results, summary = job["eval"], job["train_summary"]
    (out / "results.json").write_text(json.dumps(job, indent=2, default=str) + "\n")
    readme = _report_markdown(job, out, train_dir, model_dir, eval_table(results, markdown=True),
                              ablation_table(ablation, markdown=True),
                              probe_table(job["probe"], markdown=True))
    (out / "README.md").write_text(readme)
    print(eval_table(results))
    print(f"test bits per byte: {results['bits_per_byte']:.4f} over "
          f"{count_of(results['documents'], 'document')} ({results['tokens']:,} tokens); final "
          f"train loss "
          f"{summary.get('train_loss') or float('nan'):.4f}, val bits per byte "
          f"{summary.get('val_bpb') or float('nan'):.4f}")
    print(f"wrote {out / 'README.md'} ({job['wall_seconds'] / 60:.1f} min)")


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


# The model settings the report's table shows, in this order.
MODEL_KEYS = ("num_tokens", "dim", "depth", "heads", "dim_head", "block_width",
              "num_state_vectors", "max_seq_len", "recurrent_layers", "gate", "gate_write",
              "variant", "state_self_attention", "mlp")


def _report_markdown(job: dict, out: Path, train_dir: Path, model_dir: Path, table: str,
                     ablation: str, probe: str) -> str:
    """out/README.md: the package's templates/report.md filled with the job's values (the
    tables come made: eval_table, ablation_table, probe_table)."""
    template = (resources.files("blockrecurrent") / "templates" / "report.md").read_text("utf-8")
    values = {**_run_values(job), **_result_values(job), **_eval_values(job, out),
              **_probe_values(job), **_sample_values(job["sample"]), **_setting_rows(job),
              **_file_values(out, train_dir, model_dir),
              "eval_table": table, "ablation_table": ablation, "probe_table": probe}
    return string.Template(template).substitute(values)


def _show(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _rows(pairs) -> str:
    """Markdown table rows `| key | value |` of the plain values among pairs."""
    return "\n".join(f"| {k} | {_show(v)} |" for k, v in pairs
                     if isinstance(v, (int, float, str, bool, list)) or v is None)


def _run_values(job: dict) -> dict:
    """The report's first lines: the command, when, on what, how long."""
    quick = "**Quick mode: a smoke test of the pipeline; the numbers mean nothing.**"
    return {"command": "brt run" + (" --quick" if job["quick"] else ""),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": _git_commit() or "unknown", "python": platform.python_version(),
            "device": job["device"], "threads": job["torch_threads"], "cpus": os.cpu_count(),
            "wall_minutes": f"{job['wall_seconds'] / 60:.1f}",
            "reused": " (training reused from an earlier run)" if job["reused"] else "",
            "quick_note": quick if job["quick"] else ""}


def _result_values(job: dict) -> dict:
    """The table of results: test and validation bits, parameters, training."""
    from .evaluate.report import count_of, human_count

    ev, s = job["eval"], job["train_summary"]
    return {"documents": count_of(ev["documents"], "document"), "tokens": f"{ev['tokens']:,}",
            "bits_per_byte": f"{ev['bits_per_byte']:.4f}",
            "bits_per_token": f"{ev['bits_per_token']:.4f}",
            "evaluated_at": _show(s.get("evaluated_at")), "val_bpb": _show(s.get("val_bpb")),
            "train_loss": _show(s.get("train_loss")), "params": human_count(job["params"]),
            "non_embedding_params": f"{job['non_embedding_params']:,}",
            "steps": _show(s.get("step")), "tokens_seen": f"{s.get('tokens_seen') or 0:,}",
            "train_minutes": f"{(s.get('elapsed_s') or 0.0) / 60:.1f}",
            "data": job["train_config"].get("data")}


def _eval_values(job: dict, out: Path) -> dict:
    """The evaluation by position: its speed, the trend from first to last bucket, the plots."""
    ev = job["eval"]
    plots = [f"![training and validation loss, and the state's gain at each evaluation]({name})"
             for name in ("loss.png",) if (out / name).is_file()]
    if ev["report"].get("png"):
        plots.append(f"![test loss by position]({Path(ev['report']['png']).name})")
    buckets = [b for b in ev["buckets"] if b["bits_per_token"] is not None]
    trend = ""
    if len(buckets) > 1:
        trend = (f"From the first bucket to the last, bits per token go from "
                 f"{buckets[0]['bits_per_token']:.3f} ({buckets[0]['label']}) to "
                 f"{buckets[-1]['bits_per_token']:.3f} ({buckets[-1]['label']}): the lower the "
                 f"late-position loss, the more the model gains from the context it has read.")
    return {"eval_seconds": f"{ev['seconds']:.0f}",
            "eval_tokens_per_s": f"{ev['tokens_per_s']:,.0f}", "eval_batch": ev["batch_size"],
            "trend": trend, "plots": "\n".join(plots),
            "segment_tokens": job["model_config"].get("max_seq_len")}


def _probe_values(job: dict) -> dict:
    first = job["probe"][0]
    return {"probe_steps": first["steps"], "probe_chance": f"{first['chance']:.3f}",
            "probe_plot": "![recall probe](probe/probe.png)" if job["probe_report"].get("png")
            else ""}


def _sample_values(sample: dict) -> dict:
    """The sample: its prompt's source, and prompt and continuation in a code fence."""
    text = sample["prompt"] + sample["text"]
    return {"prompt_chars": len(sample["prompt"]), "prompt_document": sample["prompt_document"],
            "new_tokens": sample["new_tokens"],
            "decode_tokens_per_s": _show(sample.get("decode_tokens_per_s"), 1),
            "fence": "````" if "```" in text else "```", "text": text}


def _setting_rows(job: dict) -> dict:
    mc = job["model_config"]
    return {"config_file": job["config_file"] or "none (the small preset)",
            "model_rows": _rows((k, mc[k]) for k in MODEL_KEYS if k in mc),
            "train_rows": _rows(job["train_config"].items()),
            "summary_rows": _rows(job["train_summary"].items())}


def _file_values(out: Path, train_dir: Path, model_dir: Path) -> dict:
    return {"model_here": _rel(model_dir, out), "model_from_cwd": _rel(model_dir, Path.cwd()),
            "train_here": _rel(train_dir, out)}
