"""train/state_health.py: every evaluation of a recurrent run measures what its state is worth
(the other-document ablation) and logs it; a warning when it has been worth nothing."""

import pytest
from helpers import records, settings, write_word_corpus

from blockrecurrent.train.state_health import MIN_GAIN_PCT, WARN_AFTER, StateHealth
from blockrecurrent.train.trainer import train

pytestmark = pytest.mark.usefixtures("quiet_training")


def test_recurrent_runs_log_the_state_gain_and_slide_runs_do_not(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    corpus = write_word_corpus(tmp_path / "corpus", max_words=60, docs=80)  # a few val docs
    base = ["max_steps=4", "eval_interval=2", "save_interval=0"]
    summary = train(*settings(corpus, tmp_path / "rec", *base))
    evals = records(tmp_path / "rec", "eval")
    assert [r["step"] for r in evals] == [2, 4] and summary["status"] == "completed"
    for r in evals:
        assert {"state_gain", "state_gain_pct"} <= set(r)
        assert (r["state_gain"] > 0) == (r["state_gain_pct"] > 0)
    assert "state gain" in capsys.readouterr().out
    for name, extra in (("slide", "model.recurrent_layers=[]"), ("off", "state_eval_tokens=0")):
        train(*settings(corpus, tmp_path / name, *base, extra))
        assert all("state_gain" not in r for r in records(tmp_path / name, "eval"))


def test_the_gain_is_the_other_document_loss_less_the_own():
    health = StateHealth.__new__(StateHealth)
    health.corpus, health.gains, health.warned = object(), [], False
    losses = {"carry": (200.0, 100.0), "other-document": (210.0, 100.0)}  # (nats, tokens)
    fields = health.measure(lambda corpus, reset: losses[reset])
    assert fields["state_gain"] == pytest.approx(0.1)
    assert fields["state_gain_pct"] == pytest.approx(5.0)


def test_a_warning_once_after_evaluations_in_a_row_without_gain():
    health = StateHealth.__new__(StateHealth)
    health.gains, health.warned = [], False
    for _ in range(WARN_AFTER - 1):
        health.gains.append(MIN_GAIN_PCT / 2)
        assert health.warning() is None
    health.gains.append(2 * MIN_GAIN_PCT)  # one useful evaluation breaks the run
    assert health.warning() is None
    health.gains += [0.0] * WARN_AFTER
    message = health.warning()
    assert message and f"{WARN_AFTER} evaluations in a row" in message
    health.gains.append(0.0)
    assert health.warning() is None  # once


def test_documents_per_process_and_a_recurrent_model_are_needed(tmp_path):
    from blockrecurrent.train.train_data import build_data

    (tmp_path / "corpus").mkdir()
    corpus = write_word_corpus(tmp_path / "corpus", max_words=60, docs=80)
    _, tc = settings(corpus, "unused")
    _, _, val = build_data(tc)
    assert len(val) >= 2
    assert len(StateHealth(val, 10 ** 6, 1, recurrent=True).corpus) == len(val)
    assert StateHealth(val, 10 ** 6, 1, recurrent=False).corpus is None
    assert StateHealth(val, 0, 1, recurrent=True).corpus is None
    assert StateHealth(val, 10 ** 6, len(val), recurrent=True).corpus is None  # 1 per process
