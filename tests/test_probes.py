"""evaluate/probes.py: the recall tasks' layout, the state recalling beyond the window where
Slide cannot (with the report), one model per K, Adam's betas."""
import json
import math

import pytest
import torch

from blockrecurrent.evaluate.probes import (
    BETAS,
    RecallTask,
    probe_table,
    run_probes,
    train_recall,
    write_probe_report,
)
from blockrecurrent.evaluate.reach import reach_table
from blockrecurrent.evaluate.synthetic import IGNORE
from blockrecurrent.model.config import preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer
from blockrecurrent.train.settings import TrainConfig


def test_keys_task_layout():
    task = RecallTask(block_width=8, kind="keys", num_keys=2, distance=3, lead=1)
    seq, targets = task.batch(64, torch.Generator().manual_seed(0))
    assert seq.shape == targets.shape == (64, task.length) and task.length == 5 * 8
    A, marker = task.alphabet, 2 * task.alphabet
    src = seq[:, 8:16]
    for row in range(64):
        keys = src[row][src[row] < A]  # the source block's keys, in order
        assert keys.tolist() == seq[row, -2:].tolist()
        assert seq[row, -3] == marker
        # Nothing outside the source block and the questions is a key or the marker.
        rest = torch.cat([seq[row, :8], seq[row, 16:-3]])
        assert (rest > marker).all()
    assert (targets[:, :-3] == IGNORE).all() and (targets[:, -3:-1] == seq[:, -2:]).all()
    assert (targets[:, -1] == IGNORE).all()
    # 3 blocks of 8 minus the question tail: 21 tokens > 2 layers x 7 tokens of reach.
    assert task.min_gap == 3 * 8 - 2 and task.beyond_reach(depth=2)
    assert not RecallTask(block_width=8, distance=1).beyond_reach(depth=2)
    # Block windows: each layer reaches back to the start of the block before the query's.
    assert task.beyond_reach(depth=2, window="block")
    assert not task.beyond_reach(depth=3, window="block")
    assert not RecallTask(block_width=8, distance=2).beyond_reach(depth=2, window="block")


def test_pairs_task_layout():
    task = RecallTask(block_width=16, kind="pairs", num_keys=4, queries=2, distance=2)
    seq, targets = task.batch(32, torch.Generator().manual_seed(1))
    A = task.alphabet
    for row in range(32):
        src = seq[row, 32:48].tolist()
        pairs = {src[i]: src[i + 1] for i in range(0, 16, 2) if src[i] < A}
        assert len(pairs) == 4 and all(A <= v < 2 * A for v in pairs.values())
        q = seq[row, -4:].tolist()
        assert pairs[q[0]] == q[1] and pairs[q[2]] == q[3] and q[0] != q[2]
        assert targets[row, -4] == q[1] and targets[row, -2] == q[3]
    assert (targets != IGNORE).sum() == 32 * 2


def test_bad_tasks_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        RecallTask(block_width=8, kind="copy")
    with pytest.raises(ValueError, match="do not fit"):
        RecallTask(block_width=4, num_keys=4)
    with pytest.raises(ValueError, match="queries"):
        RecallTask(block_width=16, kind="pairs", num_keys=2, queries=3)
    with pytest.raises(TypeError, match="distance"):
        RecallTask(block_width=16, distance=0)
    with pytest.raises(ValueError, match="unknown probe model"):
        run_probes(models=("xl",))


def test_the_state_recalls_beyond_the_window_and_slide_does_not(tmp_path):
    """The paper's claim in miniature, through the probe suite: one key, three blocks before the
    question (beyond two window layers' reach), after a block of filler, so the state that
    stores it is not the initial one."""
    base = preset("probe", block_width=8, num_state_vectors=8)
    rows = run_probes(base, num_keys=(1,), distances=(3,), lead=1, steps=150, log=None)
    acc = {r["model"]: r["accuracy"] for r in rows}
    assert rows[0]["beyond_reach"]
    assert acc["recurrent"] > 0.9
    assert acc["slide"] < 1 / 8 + 0.07
    paths = write_probe_report(rows, tmp_path)
    assert json.loads((tmp_path / "probe.json").read_text())[0]["model"] == "recurrent"
    assert "recurrent K=1" in probe_table(rows) and paths["md"].endswith("probe.md")


def test_mixed_trains_one_model_per_k_over_all_distances(tmp_path):
    """mixed=True: one model per K, trained on every distance in turn and scored at each; the
    saved model is the one evaluated at every distance."""
    base = preset("probe", block_width=8, num_state_vectors=8)
    rows = run_probes(base, num_keys=(1, 2), distances=(1, 3), lead=1, steps=4,
                      models=("recurrent",), mixed=True, save_dir=tmp_path, log=None)
    assert [(r["num_keys"], r["distance"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["mixed"] for r in rows)
    # one model per K
    assert rows[0]["final_loss"] == rows[1]["final_loss"] != rows[2]["final_loss"]
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["recurrent-keys-K1-mixed-s0", "recurrent-keys-K2-mixed-s0"]
    with pytest.raises(TypeError, match="mixed"):
        run_probes(base, mixed="yes")


def test_beyond_scores_each_model_at_multiples_of_its_trained_distance(tmp_path):
    """One call trains at distances up to D and also scores at f * D (the reach table); the
    same model at every factor (one training), whether trained at one distance or mixed."""
    base = preset("probe", block_width=8, num_state_vectors=8)
    rows = run_probes(base, num_keys=(1,), distances=(1, 2), lead=1, steps=3, mixed=True,
                      beyond=(4,), log=None)
    assert [(r["distance"], r["factor"], r["trained_distance"]) for r in rows
            if r["model"] == "recurrent"] == [(1, 1, 2), (2, 1, 2), (8, 4, 2)]
    assert len({r["final_loss"] for r in rows if r["model"] == "recurrent"}) == 1
    table = reach_table(rows, markdown=True)
    assert "| recurrent | 1 | 2 |" in table and "4D" in table and "(8)" in table
    assert "| 8 |" not in probe_table(rows)  # the main table keeps the trained distances
    write_probe_report(rows, tmp_path)
    assert "## Beyond the trained distance" in (tmp_path / "probe.md").read_text()
    with pytest.raises(ValueError, match="beyond must hold ints >= 2"):
        run_probes(base, beyond=(1,))


def test_train_leads_train_each_task_at_every_lead_and_score_at_lead(monkeypatch):
    """train_leads: the model trains on its task at each lead in turn; it is scored at `lead`."""
    import blockrecurrent.evaluate.probes as P

    seen = []
    real = P.train_recall

    def spy(model, task, **kw):
        seen.append([(t.distance, t.lead) for t in (task if isinstance(task, list) else [task])])
        return real(model, task, **kw)

    monkeypatch.setattr(P, "train_recall", spy)
    base = preset("probe", block_width=8, num_state_vectors=8)
    rows = run_probes(base, num_keys=(1,), distances=(2,), lead=1, steps=2, models=("recurrent",),
                      train_leads=(0, 3), log=None)
    assert seen == [[(2, 0), (2, 3)]]
    assert [(r["distance"], r["lead"]) for r in rows] == [(2, 1)]


def test_the_research_hooks_are_not_the_librarys():
    """Per-parameter learning rates and per-step callbacks live in experiments/ (their own
    training loop), not in train_recall / run_probes."""
    import blockrecurrent.evaluate.probes as P

    assert not hasattr(P, "adam_groups") and not hasattr(P, "LrScale")
    with pytest.raises(TypeError, match="lr_scale"):
        run_probes(lr_scale=lambda name: 1.0)
    model = BlockRecurrentTransformer(preset("probe", block_width=8, num_state_vectors=8))
    with pytest.raises(TypeError, match="callback"):
        train_recall(model, RecallTask(block_width=8, distance=2, lead=1), steps=1,
                     callback=print)


def test_betas_reach_adam_and_default_to_the_trainers():
    """Adam's betas are the trainer's unless given; they change the second step on (the first
    step of Adam is sign-like whatever the betas)."""
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(preset("probe", block_width=8, num_state_vectors=8))
    task = RecallTask(block_width=8, distance=2, lead=1)
    assert BETAS == TrainConfig().betas
    runs = {}
    for betas in (None, BETAS, (0.9, 0.999)):
        m = BlockRecurrentTransformer(model.config)
        m.load_state_dict(model.state_dict())
        train_recall(m, task, steps=2, **({} if betas is None else {"betas": betas}))
        runs[betas] = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert torch.equal(runs[None], runs[BETAS])
    assert not torch.allclose(runs[BETAS], runs[(0.9, 0.999)])
    for bad in ((0.9,), (0.9, 1.0), "0.9 0.95", (0.9, True)):
        with pytest.raises(ValueError, match="betas"):
            run_probes(betas=bad)


def test_a_diverged_run_returns_nan_and_the_sweep_goes_on():
    model = BlockRecurrentTransformer(preset("probe", block_width=8, num_state_vectors=8))
    task = RecallTask(block_width=8, distance=2, lead=1)
    assert math.isnan(train_recall(model, task, steps=4, lr=1e30))
