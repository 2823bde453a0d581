"""Evaluation reports: the position-bucket and state-ablation tables (aligned text or
markdown), the loss-by-position plot, <name>.json + <name>.png, and human-readable counts."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def eval_table(results: dict, markdown: bool = False) -> str:
    """The position-bucket table of one evaluation, as aligned text or markdown."""
    header = ["positions", "tokens", "bits/token", "bits/byte (approx)", "loss (nats)"]
    rows = [[b["label"], f"{b['tokens']:,}", _fmt(b["bits_per_token"]),
             _fmt(b["bits_per_byte_approx"]), _fmt(b["loss"])] for b in results["buckets"]]
    rows.append(["all", f"{results['tokens']:,}", _fmt(results["bits_per_token"]),
                 _fmt(results["bits_per_byte"]), _fmt(results["loss"])])
    return _table(header, rows, markdown)


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                              for i, (x, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _figure():
    """A matplotlib Figure (no pyplot: the caller's backend is left alone), or None with a
    warning when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed, so no plot was written: "
                      "pip install 'blockrecurrent[plot]'", stacklevel=3)
        return None
    return Figure(figsize=(6.4, 4.0))


def _plot_buckets(series: dict[str, dict], path: Path, title: str) -> bool:
    """One line per entry of `series` (name -> evaluation results): bits/token by bucket, the
    token count of each bucket (of the first series) under its label."""
    fig = _figure()
    if fig is None:
        return False
    ax = fig.subplots()
    first = next(iter(series.values()))["buckets"]
    for name, res in series.items():
        pts = [(i, b["bits_per_token"]) for i, b in enumerate(res["buckets"])
               if b["bits_per_token"] is not None]
        ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xticks(range(len(first)),
                  [f"{b['label']}\n{human_count(b['tokens'])} tokens" for b in first])
    ax.set_xlabel("position in the document")
    ax.set_ylabel("bits per token (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_eval_report(results: dict, out_dir: str | os.PathLike, name: str = "eval") -> dict:
    """Write out_dir/<name>.json and out_dir/<name>.png (loss by position bucket; skipped with a
    warning without matplotlib) -> {"json": path, "png": path or None}."""
    if not isinstance(results, dict) or "buckets" not in results:
        raise TypeError("results must be the dict returned by evaluate()")
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain file name stem like 'eval-test', got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    title = (f"{name}: {results['bits_per_byte']:.3f} bits/byte over "
             f"{count_of(results['documents'], 'document')}")
    drawn = _plot_buckets({name: results}, png_path, title)
    return {"json": str(json_path), "png": str(png_path) if drawn else None}


def ablation_table(ablation: dict, markdown: bool = False) -> str:
    header = ["positions", "tokens", "state carried", "state reset", "gain (bits/token)",
              "gain (%)"]
    rows = [[g["label"], f"{g['tokens']:,}", _fmt(g["carry"]), _fmt(g["reset"]),
             _fmt(g["gain_bits"]), _fmt(g["gain_percent"], 2)] for g in ablation["gain"]]
    return _table(header, rows, markdown)


def count_of(n: int, noun: str) -> str:
    """'1 document', '2 documents', '12,345 tokens'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def human_count(n: float) -> str:
    """3870000 -> '3.87M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
