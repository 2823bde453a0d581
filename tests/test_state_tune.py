"""State tuning: a training run (train/init_from.py, `tune=state`/`state+ids`, `brt train
--tune-state`) trains only the recurrent layers' initial state (and optionally the state ids)
of a saved model; model/state_tune.py saves and applies the small file (`--state-tune`)."""

import io
import json

import pytest
import torch
from helpers import run

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.generate.text import generate_text
from blockrecurrent.model.state_tune import (
    STATE_TUNE_FILE,
    apply_state_tune,
    base_fingerprint,
    save_state_tune,
)
from blockrecurrent.train.settings import load_train_config
from blockrecurrent.train.trainer import train


def _settings(corpus, base, out, *extra):
    return load_train_config(None, None, [
        f"data={corpus}", f"out_dir={out}", f"cache_dir={corpus.parent / 'cache'}",
        f"init_from={base}", "tune=state+ids", "batch_size=4", "max_steps=12", "warmup_steps=1",
        "lr=3e-2", "min_lr=3e-2", "eval_tokens=0", "log_interval=100", "device=cpu", *extra])


@pytest.fixture(scope="module")
def tuned(saved, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    summary = train(*_settings(corpus, saved[0], out))
    return out / STATE_TUNE_FILE, summary


def test_only_the_state_changes_and_helps(saved, tuned):
    path, summary = tuned
    d, base = saved
    assert summary["state_tune"] == str(path) and summary["tuned_values"] == 2 * 16 * 64
    assert summary["tuned"] == ["layers.0.attn.initial_state", "layers.0.attn.state_ids"]
    assert path.stat().st_size < 20_000  # 2 x 16 x 64 floats and a header
    model = BlockRecurrentTransformer.from_pretrained(d)
    apply_state_tune(model, path)
    changed = {n for n, p in model.state_dict().items()
               if not torch.equal(p, base.state_dict()[n])}
    assert changed == set(summary["tuned"])
    assert base_fingerprint(model) == base_fingerprint(base)
    exported = BlockRecurrentTransformer.from_pretrained(path.parent / "model")  # the run's own
    assert base_fingerprint(exported) == base_fingerprint(base)


def test_a_resumed_tuning_run_still_trains_only_the_state(saved, corpus, tmp_path):
    from blockrecurrent.train.resume import load_resume_config

    out = tmp_path / "run"
    train(*_settings(corpus, saved[0], out, "tune=state", "max_steps=2"))
    mc, tc, _ = load_resume_config(None, None, [f"out_dir={out}", "max_steps=4"])
    assert tc.tune == "state" and tc.init_from == str(saved[0])
    summary = train(mc, tc, resume=True)
    assert summary["step"] == 4 and summary["tuned"] == ["layers.0.attn.initial_state"]
    exported = BlockRecurrentTransformer.from_pretrained(out / "model")
    assert base_fingerprint(exported) == base_fingerprint(saved[1])


def test_refuses_another_base_model_and_other_files(tuned, tmp_path):
    torch.manual_seed(1)
    other = BlockRecurrentTransformer(preset("tiny"))
    before = {n: p.clone() for n, p in other.state_dict().items()}
    with pytest.raises(ValueError, match="another base model"):
        apply_state_tune(other, tuned[0])
    assert all(torch.equal(p, before[n]) for n, p in other.state_dict().items())
    (tmp_path / "bad").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable state tuning file"):
        apply_state_tune(other, tmp_path / "bad")
    with pytest.raises(ValueError, match="does not exist"):
        apply_state_tune(other, tmp_path / "missing")
    slide = BlockRecurrentTransformer(preset("tiny", recurrent_layers=()))
    with pytest.raises(ValueError, match="no recurrent layer"):
        save_state_tune(tmp_path / "s", slide)


def test_cli(capsys, saved, corpus, tmp_path, tuned):
    d = saved[0]
    code, out, _ = run(capsys, "train", "--tune-state", d, f"data={corpus}",
                       f"out_dir={tmp_path}", f"cache_dir={corpus.parent / 'cache'}",
                       "batch_size=2", "max_steps=2", "eval_tokens=0", "device=cpu")
    assert code == 0 and (tmp_path / STATE_TUNE_FILE).is_file() and '"completed"' in out
    code, out, _ = run(capsys, "generate", d, "--prompt", "the cat", "--max-new-tokens", "8",
                       "--seed", "0", "--state-tune", tuned[0])
    want = generate_text(d, prompt="the cat", max_new_tokens=8, seed=0, out=io.StringIO(),
                         err=io.StringIO(), state_tune=tuned[0])["text"]
    assert code == 0 and out.rstrip("\n") == want.rstrip("\n")
    code, _, err = run(capsys, "train", "--tune-state", d, "--resume")
    assert code == 2 and "continue one with brt train --resume" in err
    code, _, err = run(capsys, "train", "--tune-state", d, f"init_from={d}")
    assert code == 2 and "drop init_from" in err


def test_eval_with_state_tune(capsys, saved, corpus, tmp_path, tuned):
    argv = ["eval", saved[0], "--data", corpus, "--split", "val", "--batch-size", "2",
            "--val-fraction", "0.2", "--cache-dir", tmp_path / "cache", "--out", tmp_path]
    code, _, err = run(capsys, *argv)
    plain = (tmp_path / "eval-val.json").read_text()
    code2, _, err2 = run(capsys, *argv, "--state-tune", tuned[0])
    a, b = json.loads(plain), json.loads((tmp_path / "eval-val.json").read_text())
    assert code == code2 == 0, err + err2
    assert b["loss"] < a["loss"]  # the tuned start state helps on held-out documents


def test_the_hugging_face_model_applies_it(saved, tuned):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import blockrecurrent.hf  # registers the model type

    hf = AutoModelForCausalLM.from_pretrained(saved[0]).eval()
    ours = BlockRecurrentTransformer.from_pretrained(saved[0]).eval()
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        plain = hf(x).logits
        assert hf.apply_state_tune(tuned[0])["base_fingerprint"] == base_fingerprint(ours)
        apply_state_tune(ours, tuned[0])
        assert torch.equal(hf(x).logits, ours(x)[0])
        assert not torch.equal(hf(x).logits, plain)
    torch.manual_seed(1)
    other = blockrecurrent.hf.BlockRecurrentForCausalLM.from_brt(
        BlockRecurrentTransformer(preset("tiny")))
    with pytest.raises(ValueError, match="another base model"):
        other.apply_state_tune(tuned[0])


def test_a_cast_model_is_told_to_apply_the_file_in_float32(saved, tuned):
    model = BlockRecurrentTransformer.from_pretrained(saved[0]).to(torch.bfloat16)
    with pytest.raises(ValueError, match="in torch.bfloat16: apply the file to it in float32"):
        apply_state_tune(model, tuned[0])


def test_a_sharded_tuning_run_resumes(saved, corpus, tmp_path):
    """parallel=fsdp writes sharded checkpoints (DCP) also with one process; with only the
    state training, the optimizer has one group, which DCP restores."""
    from blockrecurrent.train.resume import load_resume_config

    out = tmp_path / "run"
    train(*_settings(corpus, saved[0], out, "parallel=fsdp", "max_steps=2"))
    mc, tc, _ = load_resume_config(None, None, [f"out_dir={out}", "max_steps=3"])
    assert train(mc, tc, resume=True)["step"] == 3
    with pytest.raises(ValueError, match="tune"):  # what trains is the run's own
        train(*load_resume_config(None, None, [f"out_dir={out}", "max_steps=4", "tune=all"])[:2],
              resume=True)


def test_a_tuning_run_keeps_the_base_models_settings(saved, corpus, tmp_path):
    with pytest.raises(ValueError, match="drop model.dropout"):
        _settings(corpus, saved[0], tmp_path, "model.dropout=0.1")
    slide = tmp_path / "slide"
    BlockRecurrentTransformer(preset("tiny", recurrent_layers=())).save_pretrained(slide)
    with pytest.raises(ValueError, match="no state to tune"):
        _settings(corpus, slide, tmp_path)
