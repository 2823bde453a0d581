"""report.py, the main job (`brt run`): train, evaluate, sample and write the report, end to end on
a tiny model and corpus."""

import importlib.util
import json

import pytest
from helpers import run, tiny_config


def test_run_quick_end_to_end(capsys, tmp_path, corpus_dir):
    """The main job on a tiny model and corpus: train, evaluate, sample, report."""
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "run", "--quick", "--threads", "1", "--out", out,
                            "--config", tiny_config(tmp_path, corpus_dir), "max_steps=2")
    assert code == 0, err
    assert "test bits per byte" in stdout and "--- sample" in stdout
    for name in ("README.md", "results.json", "eval-test.json", "metrics.jsonl", "train/model"):
        assert (out / name).exists(), name
    readme = (out / "README.md").read_text()
    assert "## Loss by position in the document" in readme and "| [0, 1k) |" in readme
    if importlib.util.find_spec("matplotlib"):
        assert "![test loss by position](eval-test.png)" in readme
    res = json.loads((out / "results.json").read_text())
    assert res["train_summary"]["step"] == 2 and res["eval"]["tokens"] > 0
    # The state section: the ablation by position and the recall probe.
    assert "## Does the state help?" in readme and "state reset" in readme
    gain = {g["label"]: g for g in res["state_ablation"]}
    assert gain["all"]["tokens"] == res["eval"]["tokens"]
    assert gain["all"]["carry"] == pytest.approx(res["eval"]["bits_per_token"])
    assert {r["model"] for r in res["probe"]} == {"recurrent", "slide"}
    assert (out / "probe" / "probe.json").is_file()
    # The exported model works with the other commands.
    code, _, err = run(capsys, "generate", out / "train" / "model", "--prompt", "def",
                       "--max-new-tokens", "4", "--threads", "1")
    assert code == 0, err
