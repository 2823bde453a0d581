"""evaluate/mqar.py: the MQAR generator as the Zoology study defines it (disjoint key and value
halves, the pairs at the start, each query labelled with its key's value, power-law gaps,
seeded), the three models' configs and state sizes, logits at the queries only, training and
the report, and `brt probe --task mqar` end to end."""
import json

import pytest
import torch
from helpers import run

from blockrecurrent.evaluate.mqar import (
    MQARTask,
    cache_bytes,
    lr_at,
    mqar_accuracy,
    mqar_base,
    mqar_config,
    query_logits,
    run_mqar,
    state_bytes,
    train_mqar,
)
from blockrecurrent.evaluate.mqar_report import parse_grid, write_mqar_report
from blockrecurrent.evaluate.synthetic import IGNORE
from blockrecurrent.model.transformer import BlockRecurrentTransformer


def test_layout_keys_values_and_labels():
    task = MQARTask(seq_len=64, num_pairs=4, vocab=8192)
    s = task.sample(200, torch.Generator().manual_seed(0))
    seq, targets, keys, values = s["seq"], s["targets"], s["keys"], s["values"]
    assert seq.shape == targets.shape == (200, 64)
    half = 8192 // 2
    # Keys from the lower half (without 0), values from the upper half: disjoint.
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 8192)).all()
    # The pairs come first: key value key value ...
    assert (seq[:, 0:8:2] == keys).all() and (seq[:, 1:8:2] == values).all()
    for row in range(200):
        assert len(set(keys[row].tolist())) == 4 and len(set(values[row].tolist())) == 4
        pairs = dict(zip(keys[row].tolist(), values[row].tolist(), strict=True))
        asked = (targets[row] != IGNORE).nonzero().flatten()
        # Every key asked once, after the pairs, at an even offset from them.
        assert len(asked) == 4 and (asked >= 8).all() and ((asked - 8) % 2 == 0).all()
        assert sorted(seq[row, asked].tolist()) == sorted(pairs)
        for q in asked.tolist():
            assert targets[row, q] == pairs[seq[row, q].item()]
    assert (targets[:, :8] == IGNORE).all()
    # Filler is drawn from the whole vocabulary, as the study's random_non_queries.
    filler = seq[targets == IGNORE][8 * 200:]
    assert filler.min() < half <= filler.max()


def test_power_law_gaps():
    task = MQARTask(seq_len=256, num_pairs=1, vocab=512, power_a=0.01)
    p = task.gap_probs()
    assert len(p) == task.space == 127 and torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    assert (p[1:] < p[:-1]).all()  # decreasing
    # P(gap = i) ~ (i + 1)^(a - 1): the ratio of the first two is 2^(1 - a).
    assert p[0] / p[1] == pytest.approx(2 ** 0.99)
    s = task.sample(5000, torch.Generator().manual_seed(1))
    gaps = (s["query_pos"][:, 0] - task.context) // 2
    freq = torch.bincount(gaps, minlength=task.space).double() / len(gaps)
    assert freq[:4].tolist() == pytest.approx(p[:4].tolist(), abs=0.02)
    assert freq[64:].sum() == pytest.approx(p[64:].sum().item(), abs=0.02)
    # power_a = 1 is uniform.
    assert torch.allclose(MQARTask(64, 4, power_a=1.0).gap_probs(),
                          torch.full((28,), 1 / 28, dtype=torch.float64))


def test_seeded_and_checked():
    task = MQARTask(seq_len=128, num_pairs=8)
    a = task.batch(8, torch.Generator().manual_seed(3))
    b = task.batch(8, torch.Generator().manual_seed(3))
    c = task.batch(8, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="4 x pairs"):
        MQARTask(seq_len=64, num_pairs=17)
    with pytest.raises(ValueError, match="even"):
        MQARTask(seq_len=63, num_pairs=4)
    with pytest.raises(ValueError, match="vocab"):
        MQARTask(seq_len=64, num_pairs=4, vocab=64)
    with pytest.raises(TypeError):
        MQARTask(seq_len=64, num_pairs=0)
    assert parse_grid(["256:16", "64:4"]) == [(256, 16), (64, 4)]
    with pytest.raises(ValueError, match="SEQ_LEN:PAIRS"):
        parse_grid(["256"])


def test_reach_of_a_window():
    task = MQARTask(seq_len=256, num_pairs=16)
    r = task.reach(window=32, depth=2)
    assert 0 < r["direct_frac"] < r["reach_frac"] < 1
    assert task.reach(window=256, depth=2)["direct_frac"] == 1.0
    d = task.value_distance()
    assert d.min() >= 1 and d.max() <= 256


def test_models_and_state_sizes():
    base = mqar_base()
    task = MQARTask(seq_len=256, num_pairs=16)
    full, slide, rec = (mqar_config(base, task, m) for m in ("full", "slide", "recurrent"))
    assert full.block_width >= 256 and full.recurrent_layers == () and full.max_seq_len == 256
    assert slide.block_width == rec.block_width == 32 and slide.recurrent_layers == ()
    assert rec.recurrent_layers == (2,) and rec.max_seq_len % rec.block_width == 0
    assert full.num_tokens == 8192 and full.dim == slide.dim == rec.dim == 128
    assert state_bytes(rec) == 1 * 32 * 128 * 4 and state_bytes(slide) == 0
    assert cache_bytes(slide, 256) == 2 * 2 * 32 * 128 * 4
    assert cache_bytes(full, 256) == 2 * 2 * 256 * 128 * 4
    with pytest.raises(ValueError, match="unknown MQAR model"):
        mqar_config(base, task, "mamba")


def test_query_logits_are_the_models_logits_at_the_queries():
    task = MQARTask(seq_len=32, num_pairs=4, vocab=512)
    config = mqar_config(mqar_base(dim=32, heads=2, dim_head=16, block_width=8,
                                   num_state_vectors=4, num_tokens=512), task, "recurrent")
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(config).eval()
    seq, targets = task.batch(3, torch.Generator().manual_seed(0))
    mask = targets != IGNORE
    with torch.no_grad():
        assert torch.allclose(query_logits(model, seq, mask), model(seq)[0][mask], atol=1e-5)
    assert isinstance(model.to_logits, torch.nn.Linear)  # put back
    assert lr_at(0, 100) == pytest.approx(0.2) and lr_at(4, 100) == 1.0
    assert lr_at(99, 100) == pytest.approx(0.1, abs=0.01)


def test_training_learns_a_small_setting():
    """Full attention on 2 pairs in 16 tokens of a 64-token vocabulary is well above chance
    (1/32) after 150 small steps (0.38 with this seed)."""
    torch.manual_seed(0)
    task = MQARTask(seq_len=16, num_pairs=2, vocab=64)
    base = mqar_base(dim=32, heads=2, dim_head=16, block_width=8, num_state_vectors=4,
                     num_tokens=64)
    model = BlockRecurrentTransformer(mqar_config(base, task, "full"))
    before = mqar_accuracy(model, task, num_sequences=256)
    train_mqar(model, task, steps=150, batch_size=32, lr=3e-3, seed=0)
    after = mqar_accuracy(model, task, num_sequences=256)
    assert before < 0.1 and after > 0.2, (before, after)


def test_run_and_report(tmp_path):
    base = mqar_base(dim=32, heads=2, dim_head=16, block_width=8, num_state_vectors=4,
                     num_tokens=512)
    rows = run_mqar(base, grid=[(32, 4)], steps=2, batch_size=4, vocab=512, seeds=(0, 1),
                    num_test=16, log=None)
    assert [(r["model"], r["seed"]) for r in rows] == [
        (m, s) for m in ("full", "slide", "recurrent") for s in (0, 1)]
    assert {r["window"] for r in rows} == {32, 8}
    paths = write_mqar_report(rows, tmp_path)
    assert json.loads((tmp_path / "mqar.json").read_text()) == json.loads(json.dumps(rows))
    md = (tmp_path / "mqar.md").read_text()
    assert "recurrent S=4" in md and "| full |" in md
    if paths["png"]:
        assert (tmp_path / "mqar.png").stat().st_size > 0


def test_brt_probe_task_mqar(capsys, tmp_path):
    out = tmp_path / "mqar"
    code, stdout, err = run(capsys, "probe", "--task", "mqar", "--threads", "1", "--grid",
                            "32:4", "--steps", "2", "--batch-size", "4", "--out", out,
                            "dim=32", "heads=2", "dim_head=16", "block_width=8",
                            "num_state_vectors=4")
    assert code == 0, err
    assert "recurrent S=4" in stdout and "slide" in stdout and "full" in stdout
    rows = json.loads((out / "mqar.json").read_text())
    assert {r["model"] for r in rows} == {"full", "slide", "recurrent"}
    assert all(r["vocab"] == 8192 and r["dim"] == 32 for r in rows)
    assert {r["window"] for r in rows} == {8, 32} and {r["state_vectors"] for r in rows} == {0, 4}
    assert (out / "mqar.md").is_file()
    code, _, err = run(capsys, "probe", "--task", "recall", "--models", "full")
    assert code == 2 and "--task mqar" in err


def test_a_diverged_run_stops_with_the_trainers_error():
    """NonFiniteLossError: the command line reports it in one line (exit 1)."""
    from blockrecurrent.errors import NonFiniteLossError

    task = MQARTask(seq_len=64, num_pairs=4, vocab=128)
    model = BlockRecurrentTransformer(mqar_config(mqar_base(), task, "slide"))
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        train_mqar(model, task, steps=4, batch_size=4, lr=1e30)
