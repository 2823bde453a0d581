"""evaluate/compare.py (`brt compare`): the recurrent model and its baselines trained at equal
tokens and steps, evaluated on the same documents, a rerun reusing the finished runs."""

import json

import pytest
from helpers import run, tiny_config


def test_compare_end_to_end(capsys, tmp_path, corpus_dir):
    """Four tiny models at equal training tokens and steps; a rerun reuses the finished runs."""
    out = tmp_path / "cmp"
    argv = ["compare", "--threads", "1", "--config", tiny_config(tmp_path, corpus_dir),
            "--out", out, "--max-eval-tokens", "2000"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    res = json.loads((out / "comparison.json").read_text())["models"]
    assert list(res) == ["recurrent", "slide", "slide+1", "xl"]
    rec, slide, slide1, xl = res.values()
    # Equal steps, tokens and lanes: XL's segment is one block (16 of 64), so each step reads
    # 4 consecutive segments of the same lanes.
    assert rec["summary"]["step"] == xl["summary"]["step"] == slide["summary"]["step"] == 2
    positions = [r["train_config"]["batch_size"] * r["train_config"]["grad_accum"]
                 * r["model_config"]["max_seq_len"] for r in (rec, xl)]
    assert positions[0] == positions[1]
    assert xl["train_config"]["batch_size"] == rec["train_config"]["batch_size"]
    assert xl["train_config"]["grad_accum"] == 4 * rec["train_config"]["grad_accum"]
    assert slide["model_config"]["depth"] == rec["model_config"]["depth"]
    assert slide1["model_config"]["depth"] == rec["model_config"]["depth"] + 1
    assert (slide["model_config"]["recurrent_layers"] == slide1["model_config"]["recurrent_layers"]
            == [])
    assert xl["train_config"]["baseline"] == "xl" and xl["model_config"]["depth"] == 3
    assert rec["eval"]["test"]["tokens"] == xl["eval"]["test"]["tokens"]  # same documents
    gain = {g["label"]: g for g in rec["state_ablation"]}
    assert gain["all"]["carry"] == pytest.approx(rec["eval"]["test"]["bits_per_token"])
    table = (out / "comparison.md").read_text()
    assert "| Rec:fixed:skip (2L) |" in table and "| Slide:2L |" in table
    assert "| Slide:3L |" in table and "XL:16" in table and "state ablation" in table
    code, _, err = run(capsys, *argv)
    assert code == 0 and err.count("reusing the finished run") == 4
    # Other settings with the same out_dir: refused before any work.
    code, _, err = run(capsys, *argv, "lr=0.002")
    assert code == 2 and "other settings" in err


def test_compare_fits_what_the_user_left_unset(tmp_path):
    """Each model of brt compare fits warmup and lanes to a small corpus as brt train does."""
    from blockrecurrent.evaluate.compare import _scaled_train_config
    from blockrecurrent.train.settings import load_train_config

    tc = load_train_config(None, "tiny", ["max_steps=50", "lr=0.002"])[1]
    xl = _scaled_train_config(tc, "xl", 4, tmp_path / "xl")
    assert xl.unset == tc.unset == {"warmup_steps", "batch_size", "eval_tokens"}
    assert xl.warmup_steps == 5
