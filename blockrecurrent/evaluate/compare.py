"""The recurrent model against its baselines (paper section 4), trained and evaluated side by side.

    result = compare(preset="small", out_dir="runs/compare")   # comparison.{md,json,png}

Also the run management that the main job shares: a finished run of the same settings is
reused, an interrupted one resumed (`train_or_reuse`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..errors import TrainingInterrupted
from ..model.config import as_saved_now
from ..model.transformer import BlockRecurrentTransformer
from .evaluation import _check_int, auto_batch_size, evaluate, load_heldout, state_ablation
from .report import _fmt, _plot_buckets, _table, ablation_table, count_of, human_count


def _label(name: str, config) -> str:
    """The paper's names: Rec:fixed:skip, Slide:13L, XL:512."""
    if name == "recurrent":
        return f"Rec:{config.gate}:{config.variant} ({config.depth}L)"
    if name.startswith("slide"):
        return f"Slide:{config.depth}L"
    return f"XL:{config.block_width} ({config.depth}L)"


def _scaled_train_config(tc, baseline: str, factor: int, out_dir: Path):
    """The training settings of one model: its baseline, its own out_dir, and (XL) `factor`
    times the segments per step (grad_accum): the same lanes read `factor` consecutive
    one-window segments, so the optimizer steps, the training tokens and the documents in each
    batch stay equal. (Giving XL `factor` times the lanes instead gave it more documents per
    batch, worth far more than the architecture: `benchmarks/batch_shape.py`.)"""
    scaled = dataclasses.replace(tc, baseline=baseline, out_dir=str(out_dir),
                                 grad_accum=tc.grad_accum * factor)
    scaled.unset = tc.unset  # what the user left unset is fitted for every model alike
    return scaled


def _run_settings(model_config, train_config) -> dict:
    return json.loads(json.dumps({"model_config": model_config.to_dict(),
                                  "train_config": train_config.to_dict()}))


def check_reusable(model_config, train_config) -> bool:
    """True when train_config.out_dir holds a finished run (summary.json) of these settings;
    ValueError when it holds one of other settings. Checked before any work is done."""
    diff = finished_run_diff(model_config, train_config)
    if diff:
        raise ValueError(f"{train_config.out_dir} holds a finished run with other settings "
                         f"({{name: (finished run, now)}}: {diff}); choose another output "
                         f"directory or delete {train_config.out_dir}")
    return diff is not None


def finished_run_diff(model_config, train_config) -> dict | None:
    """How the finished run in train_config.out_dir (its summary.json) differs from these
    settings, {name: (finished run, now)}: {} the same, None where there is no finished run."""
    prior = Path(train_config.out_dir) / "summary.json"
    if not prior.is_file():
        return None
    saved = json.loads(prior.read_text())
    saved = {k: saved.get(k) for k in ("model_config", "train_config")}
    saved["model_config"] = as_saved_now(saved["model_config"])  # a run from before a field
    now = _run_settings(model_config, train_config)
    return {f"{part}.{k}": (old.get(k), new.get(k))
            for part in now for old, new in [(saved[part] or {}, now[part])]
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def train_or_reuse(model_config, train_config, label: str = "model") -> dict:
    """The trainer's summary of a run in train_config.out_dir: reused when a finished run of the
    same settings is there (its summary.json), resumed from its latest checkpoint when an
    interrupted one is, trained from scratch otherwise. So an interrupted job just reruns."""
    from ..train.checkpoint import latest_checkpoint
    from ..train.trainer import train

    out = Path(train_config.out_dir)
    if check_reusable(model_config, train_config):
        print(f"{label}: reusing the finished run in {out}", file=sys.stderr)
        return json.loads((out / "summary.json").read_text())["summary"]
    resume = latest_checkpoint(out) is not None
    print(f"{label}: {'resuming' if resume else 'training'} in {out}", file=sys.stderr)
    summary = train(model_config, train_config, resume=resume)
    if summary.get("status") != "completed":
        raise TrainingInterrupted(f"{label}: training in {out} was interrupted; rerun to resume "
                                  f"from its latest checkpoint")
    (out / "summary.json").write_text(json.dumps(
        {**_run_settings(model_config, train_config), "summary": summary}, indent=2,
        default=str) + "\n")
    return summary


def eval_device(train_config) -> str:
    """Where to evaluate a model the trainer made: CUDA when it trained there (or could)."""
    return "cuda" if torch.cuda.is_available() and train_config.device != "cpu" else "cpu"


def compare(config=None, preset: str | None = None, overrides=(), out_dir="runs/compare", *,
            extra_layer: bool = True, eval_batch_size: int | None = None,
            max_eval_tokens: int | None = None,
            splits: Sequence[str] = ("val", "test"), progress: bool = True) -> dict:
    """Train the recurrent model and its baselines (train.settings.baseline_configs: Slide:NL,
    Slide:(N+1)L with extra_layer, and XL:W as deep as the deepest Slide) from one config (the
    trainer's `load_train_config(config, preset, overrides)`) at equal training tokens and
    equal optimizer steps, evaluate all on the same held-out documents (the longest first, so
    that late positions are filled), add the state ablation of the recurrent model, and write
    out_dir/comparison.{md,json,png}.

    Each model trains in out_dir/<name>. XL's segment is one window, so each of its steps
    reads max_seq_len / block_width consecutive segments of the same lanes. Parameter counts
    are printed and tabulated. A model whose out_dir already holds a finished run with the same
    settings (summary.json) is reused, an interrupted one resumed, so an
    interrupted comparison continues where it stopped. Evaluation reads every model with the
    recurrent model's segment length (the results do not depend on it: memories are carried),
    eval_batch_size documents side by side (None: auto_batch_size)."""
    from ..train.settings import load_train_config

    if not isinstance(extra_layer, bool):
        raise TypeError(f"extra_layer must be a bool, got {type(extra_layer).__name__}")
    _check_int("eval_batch_size", eval_batch_size, 1, allow_none=True)
    _check_int("max_eval_tokens", max_eval_tokens, 1, allow_none=True)
    if isinstance(splits, str) or not splits or any(s not in ("val", "test") for s in splits):
        raise ValueError(f"splits must be a non-empty sequence of 'val' and/or 'test', "
                         f"got {splits!r}")
    model_config, tc = load_train_config(config, preset, list(overrides))
    if tc.baseline != "recurrent":
        raise ValueError(f"compare trains all three models itself; drop baseline={tc.baseline}")
    out = Path(out_dir)
    plan = _plan(model_config, tc, extra_layer, out)
    runs = {}
    for name, (mc, tci) in plan.items():
        summary = train_or_reuse(mc, tci, name)
        runs[name] = {"label": _label(name, mc), "summary": summary, **_run_settings(mc, tci)}
    _evaluate_runs(runs, tc, splits, model_config.max_seq_len, eval_batch_size, max_eval_tokens,
                   progress)
    markdown = _write_comparison(out, runs, splits, max_eval_tokens, extra_layer)
    return {"models": runs, "markdown": markdown, "out_dir": str(out)}


def _plan(model_config, tc, extra_layer: bool, out: Path) -> dict:
    """name -> (model config, its train config): every model's run (the recurrent model and its
    baselines, train.settings.baseline_configs), checked before any training, with its parameter
    count printed."""
    from ..train.settings import apply_baseline, baseline_configs, baseline_of

    if not model_config.recurrent_layers:
        raise ValueError("compare needs a recurrent model config (recurrent_layers is empty); "
                         "drop model.recurrent_layers=() from the settings")
    segment = model_config.max_seq_len
    plan = {}
    for name, mc in baseline_configs(model_config, extra_layer).items():
        baseline = baseline_of(name)
        trained = apply_baseline(mc, baseline)  # what the trainer builds (num_tokens aside)
        tci = _scaled_train_config(tc, baseline, segment // trained.max_seq_len, out / name)
        check_reusable(mc, tci)  # other settings in the way: fail now, not after hours
        plan[name] = (mc, tci)
    print("models (parameters without embeddings):", file=sys.stderr)
    for name, (mc, tci) in plan.items():
        trained = apply_baseline(mc, tci.baseline)
        print(f"  {_label(name, mc):24s} {BlockRecurrentTransformer(trained).num_params():>12,}  "
              f"segment {trained.max_seq_len}, {tci.max_steps} steps x batch {tci.batch_size}"
              f" x {tci.grad_accum} segments",
              file=sys.stderr)
    return plan


def _evaluate_runs(runs: dict, tc, splits, segment: int, eval_batch_size, max_eval_tokens,
                   progress: bool) -> None:
    """Every trained model on the same held-out documents of each split (run["eval"]), and the
    recurrent model's state ablation on the last split (run["state_ablation"])."""
    from ..data.tokenizer import load_tokenizer

    corpora = {}  # (tokenizer fingerprint, split) -> corpus: the same documents for every model
    device = eval_device(tc)
    for name, run in runs.items():
        model_dir = Path(run["summary"]["model_dir"])
        model = BlockRecurrentTransformer.from_pretrained(model_dir, map_location=device)
        tokenizer = load_tokenizer(model_dir)
        run.update(params=model.num_params(non_embedding=False),
                   non_embedding_params=model.num_params(), eval={})
        for split in splits:
            key = (tokenizer.fingerprint, split)
            if key not in corpora:
                corpora[key] = load_heldout(tc.data, tokenizer, split, text_field=tc.text_field,
                                            cache_dir=tc.cache_dir or None)
            batch = eval_batch_size or auto_batch_size(corpora[key], device, max_eval_tokens)
            kw = dict(batch_size=batch, segment_len=segment, max_tokens=max_eval_tokens,
                      device=device, progress=progress, select="longest")
            res = evaluate(model, corpora[key], desc=f"eval {name} {split}", **kw)
            if name == "recurrent" and split == splits[-1]:
                run["state_ablation"] = state_ablation(model, corpora[key], carry=res,
                                                       **kw)["gain"]
            res.pop("per_document")
            run["eval"][split] = res


def _write_comparison(out: Path, runs: dict, splits, max_eval_tokens, extra_layer: bool) -> str:
    """out/comparison.md, .json and .png; returns the markdown."""
    markdown = comparison_markdown(runs, splits)
    gain = runs["recurrent"].get("state_ablation")
    if gain:
        markdown += ("\n\nThe state ablation of the recurrent model (" + splits[-1] +
                     " split): the same model with its state reset to the initial state at every"
                     " segment, the window's cache still carried; gain = reset - carried bits "
                     "per token.\n\n" + ablation_table({"gain": gain}, markdown=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(markdown + "\n")
    (out / "comparison.json").write_text(json.dumps(
        {"models": runs, "max_eval_tokens": max_eval_tokens, "extra_layer": extra_layer},
        indent=2, default=str) + "\n")
    split = "test" if "test" in splits else splits[0]
    _plot_buckets({r["label"]: r["eval"][split] for r in runs.values()}, out / "comparison.png",
                  f"held-out {split} documents: loss by position")
    return markdown


def comparison_markdown(runs: dict, splits: Sequence[str] = ("val", "test")) -> str:
    """The comparison table: one row per model."""
    split = "test" if "test" in splits else splits[0]
    labels = [b["label"] for b in next(iter(runs.values()))["eval"][split]["buckets"]]
    header = ["model", "params", "non-emb. params", "train tokens", "train time", "train tok/s",
              *(f"{s} bits/byte" for s in splits), *(f"{split} bits/token {lab}" for lab in labels),
              "eval tok/s"]
    rows = []
    for run in runs.values():
        s, ev = run["summary"], run["eval"]
        secs = s.get("elapsed_s") or 0.0
        tokens = s.get("tokens_seen") or 0
        rows.append([run["label"], human_count(run["params"]),
                     human_count(run["non_embedding_params"]), human_count(tokens), _duration(secs),
                     f"{tokens / secs:,.0f}" if secs else "n/a",
                     *(_fmt(ev[sp]["bits_per_byte"]) for sp in splits),
                     *(_fmt(b["bits_per_token"]) for b in ev[split]["buckets"]),
                     f"{ev[split]['tokens_per_s']:,.0f}"])
    first = next(iter(runs.values()))["eval"][split]
    note = (f"\n\nTraining tokens are the real (non-padding) tokens seen; every model saw the "
            f"same number of segment positions (steps x batch x segment). Evaluation: "
            f"{count_of(first['documents'], f'held-out {split} document')}, "
            f"{first['tokens']:,} tokens, each "
            f"read once from its start with memories carried. Bits per token by position of the "
            f"token in its document; empty buckets show n/a.")
    return _table(header, rows, markdown=True) + note


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


