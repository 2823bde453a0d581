"""report.py, the main job (`brt run`): train, evaluate, sample and write the report, end to end on
a tiny model and corpus."""

import importlib.util
import json
import os

import pytest
from helpers import run, tiny_config

from blockrecurrent.cli import main


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


def test_quick_and_full_main_jobs_train_in_their_own_folders(capsys, tmp_path, monkeypatch):
    """`brt run --quick` then `brt run`: the quick job's finished run cannot block the full one."""
    import blockrecurrent.evaluate.compare

    class Stop(Exception):
        pass

    seen = []

    def stop(model_config, train_config):  # the first check of the run's folder: stop there
        seen.append(train_config.out_dir)
        raise Stop

    monkeypatch.setattr(blockrecurrent.evaluate.compare, "check_reusable", stop)
    monkeypatch.chdir(tmp_path)
    for argv in (["--quick"], [], ["--quick", "--out", "mine"]):
        with pytest.raises(Stop):
            main(["run", *argv])
    assert seen == [os.path.join("report-quick", "train"), os.path.join("report", "train"),
                    os.path.join("mine", "train")]


def test_main_job_moves_its_own_finished_run_of_other_settings_aside(capsys, tmp_path,
                                                                      monkeypatch):
    """report/train left by a run of other settings (an older --quick job): moved to
    report/train-previous with a note, not refused; a folder given as out_dir= is refused."""
    import blockrecurrent.evaluate.compare

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # training would start here
        raise Stop

    monkeypatch.setattr(blockrecurrent.evaluate.compare, "train_or_reuse", stop)
    monkeypatch.chdir(tmp_path)
    other = {"model_config": {"dim": 1}, "train_config": {"max_steps": 10}, "summary": {}}
    (tmp_path / "report" / "train").mkdir(parents=True)
    (tmp_path / "report" / "train" / "summary.json").write_text(json.dumps(other))
    with pytest.raises(Stop):
        main(["run"])
    err = capsys.readouterr().err
    moved = os.path.join("report", "train-previous")
    assert f"held a finished run with other settings; moved it to {moved}" in err
    assert (tmp_path / moved / "summary.json").is_file()
    assert not (tmp_path / "report" / "train").exists()
    code, _, err = run(capsys, "run", f"out_dir={moved}")
    assert code == 2 and "other settings" in err and (tmp_path / moved).is_dir()


def test_report_template_is_package_data():
    """The report's text is templates/report.md, read with importlib.resources: pyproject.toml
    ships it in the wheel, and every placeholder in it is one that report.py fills."""
    import re
    import string
    from importlib import resources
    from pathlib import Path

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "templates/*.md" in data["package-data"]["blockrecurrent"]
    text = (resources.files("blockrecurrent") / "templates" / "report.md").read_text("utf-8")
    names = {m[1] or m[2] for m in string.Template.pattern.findall(text)}
    source = (root / "blockrecurrent" / "report.py").read_text()
    filled = set(re.findall(r'"(\w+)":', source))
    assert names and names <= filled, names - filled
