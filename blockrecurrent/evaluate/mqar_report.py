"""MQAR's results (evaluate/mqar.py) as the Zoology study shows them: accuracy by sequence
length and pairs, and against the bytes of state a model keeps (mqar.md, mqar.json, mqar.png);
and `brt probe --task mqar`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .mqar import MODELS, MQAR_MODEL, run_mqar

__all__ = ["mqar_table", "parse_grid", "probe_main", "summarise", "write_mqar_report"]


def _key(r: dict) -> tuple:
    return (r["seq_len"], r["num_pairs"], r["dim"], r["slide_window"], r["steps"],
            r["batch_size"])


def _label(r: dict) -> str:
    if r["model"] == "recurrent":
        return f"recurrent S={r['state_vectors']}"
    return r["model"]


def summarise(rows: list[dict]) -> dict:
    """{(seq_len, pairs, dim, window, steps, batch): {label: (mean accuracy, min, max, seeds,
    row)}}."""
    acc: dict = {}
    for r in rows:
        acc.setdefault(_key(r), {}).setdefault(_label(r), []).append(r)
    return {k: {m: (sum(x["accuracy"] for x in rs) / len(rs),
                    min(x["accuracy"] for x in rs), max(x["accuracy"] for x in rs), len(rs),
                    rs[0])
                for m, rs in by_m.items()}
            for k, by_m in sorted(acc.items())}


def _order(label: str) -> tuple:
    return (MODELS.index(label.split()[0]), label)


def mqar_table(rows: list[dict], markdown: bool = True) -> str:
    """One line per (setting, model): mean accuracy over seeds (min-max), seeds, state sizes,
    Slide's reach and the seconds per step."""
    from .report import _table

    header = ["seq_len", "pairs", "dim", "W", "model", "steps x batch", "accuracy", "seeds",
              "state bytes", "inference bytes", "Slide reach", "s/step"]
    body = []
    for (n, k, dim, _, steps, batch), by_m in summarise(rows).items():
        for label in sorted(by_m, key=_order):
            mean, lo, hi, count, r = by_m[label]
            spread = f" ({lo:.3f}-{hi:.3f})" if count > 1 else ""
            body.append([str(n), str(k), str(dim), str(r["window"]), label,
                         f"{steps} x {batch}", f"{mean:.3f}{spread}", str(count),
                         f"{r['state_bytes']:,}",
                         f"{r['inference_bytes']:,}",
                         f"{r['reach_frac']:.3f} / {r['direct_frac']:.3f}",
                         f"{r['seconds_per_step']:.2f}"])
    return _table(header, body, markdown)


def write_mqar_report(rows: list[dict], out_dir, title: str = "MQAR") -> dict:
    """out_dir/mqar.json (every run), mqar.md (the table) and mqar.png (accuracy against the
    inference state's bytes, and against the sequence length)."""
    from ..files import write_atomic, write_json
    from .report import _figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "mqar.json", rows)
    text = (f"# {title}\n\nAccuracy on the queries' values (mean over seeds, min-max); state "
            f"bytes: the recurrent state (fp32); inference bytes: it plus the attention cache a "
            f"token reads; Slide reach: the fraction of queries whose value is within "
            f"depth x (W - 1) / within W - 1 tokens of a window of the Slide model's W.\n\n"
            f"{mqar_table(rows)}\n")
    write_atomic(out / "mqar.md", lambda f: f.write(text.encode()))
    png = None
    fig = _figure()
    if fig is not None and rows:
        fig.set_size_inches(11, 4.2)
        ax_bytes, ax_len = fig.subplots(1, 2)
        summary = summarise(rows)
        markers = {"full": "s", "slide": "v", "recurrent": "o"}
        for (n, k, dim, *_), by_m in summary.items():
            for label, (mean, lo, hi, _, r) in by_m.items():
                ax_bytes.errorbar([r["inference_bytes"]], [mean],
                                  yerr=[[mean - lo], [hi - mean]], marker=markers[r["model"]],
                                  linestyle="none", capsize=2,
                                  label=f"{label}, n={n} K={k} d={dim}")
        ax_bytes.set_xscale("log")
        ax_bytes.set_xlabel("inference state (bytes, fp32, log scale)")
        ax_bytes.set_ylabel("MQAR accuracy")
        ax_bytes.set_ylim(-0.02, 1.02)
        ax_bytes.grid(alpha=0.3)
        ax_bytes.legend(fontsize=6)
        series: dict = {}
        for (n, _, dim, *_), by_m in summary.items():
            for label, (mean, *_rest) in by_m.items():
                series.setdefault((label, dim), []).append((n, mean))
        for (label, dim), pts in sorted(series.items()):
            pts.sort()
            ax_len.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if label == "slide" else "-",
                        label=f"{label}, dim {dim}")
        for (n, *_), by_m in summary.items():
            r = next(iter(by_m.values()))[4]
            ax_len.plot([n], [r["reach_frac"]], marker="_", color="grey", markersize=14)
        ax_len.set_xscale("log", base=2)
        ax_len.set_xlabel("sequence length (tokens)")
        ax_len.set_ylim(-0.02, 1.02)
        ax_len.grid(alpha=0.3)
        ax_len.legend(fontsize=7, title="grey: Slide's reach", title_fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        png = out / "mqar.png"
        fig.savefig(png, dpi=120)
    return {"json": str(out / "mqar.json"), "md": str(out / "mqar.md"),
            "png": str(png) if png else None}


# --- `brt probe --task mqar` ----------------------------------------------------------------


def parse_grid(cells: Iterable[str]) -> list[tuple[int, int]]:
    """["256:16", "512:64"] -> [(256, 16), (512, 64)]."""
    grid = []
    for cell in cells:
        try:
            n, k = (int(x) for x in str(cell).split(":"))
        except ValueError:
            raise ValueError(f"an MQAR setting looks like SEQ_LEN:PAIRS (e.g. 256:16), got "
                             f"{cell!r}") from None
        grid.append((n, k))
    return grid


def probe_main(args, overrides: list[str]) -> int:
    """`brt probe --task mqar`: the three models (or --models) on every --grid setting, model
    settings key=value over MQAR_MODEL; writes mqar.json, mqar.md and mqar.png to --out."""
    from ..train.settings import load_train_config

    def toml(v):
        if isinstance(v, bool):
            return str(v).lower()
        return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)

    defaults = [f"model.{k}={toml(v)}" for k, v in MQAR_MODEL.items()]
    config = load_train_config(preset="probe", overrides=defaults + [
        "model." + o.strip().removeprefix("model.") for o in overrides])[0]
    models = args.models or list(MODELS)
    rows = run_mqar(config, grid=parse_grid(args.grid), models=models, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, seeds=args.seeds)
    paths = write_mqar_report(rows, args.out, title="MQAR")
    print(mqar_table(rows, markdown=False))
    print("wrote " + ", ".join(p for p in paths.values() if p))
    return 0
