"""The metrics of a training run: out_dir/metrics.jsonl (one JSON record a line), the same
scalars in TensorBoard (tensorboard=true), and out_dir/loss.png. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ..files import write_atomic


class MetricsLog:
    """Rank 0's metrics files of one run; on the other ranks every method does nothing."""

    def __init__(self, out_dir, is_main: bool = True):
        self.out_dir, self.is_main = Path(out_dir), is_main
        self.path = self.out_dir / "metrics.jsonl"
        self._tb = None

    def start_new(self) -> None:
        """A new run: drop a metrics.jsonl left by a run that never checkpointed."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)

    def truncate(self, step: int) -> None:
        """A resumed run: drop what the interrupted run logged after its checkpoint at `step`."""
        if self.is_main and self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if _logged_step(ln) <= step]
            write_atomic(self.path, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))

    def open_tensorboard(self) -> None:
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, elapsed: float, record: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, **record, "time": round(elapsed, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "event") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def plot(self) -> None:
        if self.is_main and self.path.is_file():  # nothing logged yet: no plot
            plot_metrics(self.path, self.out_dir / "loss.png")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn or foreign line: dropped


_warned_plot = False


def plot_metrics(metrics_path, png_path) -> bool:
    """Train and validation loss against step, from metrics.jsonl, and below it the state's gain
    where the evaluations measured it (needs matplotlib)."""
    global _warned_plot
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        if not _warned_plot:
            warnings.warn("matplotlib is not installed, so no loss.png: pip install "
                          "blockrecurrent[plot]", stacklevel=2)
            _warned_plot = True
        return False
    lines = Path(metrics_path).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    gain = [(r["step"], r["state_gain_pct"]) for r in records
            if r.get("event") == "eval" and r.get("state_gain_pct") is not None]
    fig = Figure(figsize=(7, 6.5 if gain else 4))
    ax, *rest = fig.subplots(2 if gain else 1, 1, sharex=True, squeeze=False)[:, 0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if gain:  # the state's worth (state_health.py): the loss it saves, in percent
        rest[0].plot(*zip(*gain, strict=True), "o-", color="tab:green")
        rest[0].axhline(0, color="grey", linewidth=0.8)
        rest[0].set(xlabel="step", ylabel="state gain (% of the loss)")
        rest[0].grid(alpha=0.3)
    png_path = Path(png_path)
    write_atomic(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    return True
