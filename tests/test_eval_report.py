"""evaluate/report.py: <name>.json and the loss-by-position plot, with and without matplotlib,
the tables and human-readable counts."""

import json
import sys

import pytest
from helpers import eval_model, mixed_length_corpus

from blockrecurrent.evaluate.evaluation import evaluate
from blockrecurrent.evaluate.report import eval_table, human_count, write_eval_report

BUCKETS = (0, 16, 64, 128)


@pytest.fixture(scope="module")
def result():
    """An evaluation of the tiny model on documents of mixed lengths, in four buckets."""
    return evaluate(eval_model(), mixed_length_corpus(), buckets=BUCKETS, progress=False)


def test_write_eval_report(result, tmp_path):
    res = result
    paths = write_eval_report(res, tmp_path / "out", "eval-test")
    saved = json.loads((tmp_path / "out" / "eval-test.json").read_text())
    assert saved["bits_per_byte"] == res["bits_per_byte"] and len(saved["buckets"]) == 4
    pytest.importorskip("matplotlib")
    assert paths["png"] and (tmp_path / "out" / "eval-test.png").read_bytes()[:4] == b"\x89PNG"
    table = eval_table(res, markdown=True)
    assert table.count("\n") == 2 + 4 and "| all |" in table
    with pytest.raises(ValueError, match="plain file name"):
        write_eval_report(res, tmp_path, "a/b")


def test_write_eval_report_without_matplotlib(result, tmp_path, monkeypatch):
    res = result
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        paths = write_eval_report(res, tmp_path, "eval")
    assert paths["png"] is None and (tmp_path / "eval.json").is_file()


def test_human_count():
    assert [human_count(n) for n in (0, 999, 1500, 3_870_000, 2.5e9, -2000)] == [
        "0", "999", "1.50k", "3.87M", "2.50B", "-2.00k"]
