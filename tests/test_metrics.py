"""train/metrics.py: metrics.jsonl written by rank 0 only, cut back to a checkpoint's step on
resume (a torn last line dropped), and the loss plot."""

import json

import pytest

from blockrecurrent.train.metrics import MetricsLog, plot_metrics


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_log_truncate_and_start_new(tmp_path):
    log = MetricsLog(tmp_path / "run")
    log.start_new()
    for step in (1, 2, 3, 4):
        log.log(step, step * 0.5, {"event": "train", "loss": 5.0 - step})
    log.log(4, 2.25, {"event": "eval", "val_loss": 1.5})
    first = json.loads(log.path.read_text().splitlines()[0])
    assert first == {"step": 1, "event": "train", "loss": 4.0, "time": 0.5}
    with open(log.path, "a") as f:
        f.write('{"step": 5, "ev')  # torn by a crash mid-write
    log.truncate(2)  # resumed from the step-2 checkpoint
    assert steps(log.path) == [1, 2]
    log.start_new()  # a new run drops what a run that never checkpointed left
    assert not log.path.exists()


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path / "rank1", is_main=False)
    log.start_new()
    log.log(1, 0.1, {"event": "train", "loss": 1.0})
    log.truncate(0)
    log.plot()
    log.close()
    assert not (tmp_path / "rank1").exists()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    log = MetricsLog(tmp_path)
    log.start_new()
    for step in range(1, 5):
        log.log(step, 0.0, {"event": "train", "loss": 3.0 / step})
    log.log(4, 0.0, {"event": "eval", "val_loss": 1.0})
    assert plot_metrics(log.path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_adds_the_state_gain_below_the_loss(tmp_path):
    pytest.importorskip("matplotlib")
    log = MetricsLog(tmp_path)
    log.start_new()
    log.log(2, 0.0, {"event": "train", "loss": 3.0})
    log.log(2, 0.0, {"event": "eval", "val_loss": 2.0, "state_gain": 0.02,
                     "state_gain_pct": 1.0})
    log.log(4, 0.0, {"event": "eval", "val_loss": 1.5, "state_gain": 0.03,
                     "state_gain_pct": 2.0})
    assert plot_metrics(log.path, tmp_path / "with_gain.png")
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "again.png")
    from PIL import Image  # matplotlib depends on pillow

    tall = Image.open(tmp_path / "with_gain.png").size[1]
    log.start_new()
    log.log(1, 0.0, {"event": "train", "loss": 3.0})
    plot_metrics(log.path, tmp_path / "plain.png")
    assert tall > Image.open(tmp_path / "plain.png").size[1]  # a second panel
