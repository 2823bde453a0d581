"""train/init_from.py: runs that start from a saved model (fine-tuning)."""

import json

import pytest
import torch

from blockrecurrent.data.tokenizer import load_tokenizer
from blockrecurrent.train.settings import load_train_config
from blockrecurrent.train.train_data import build_data
from blockrecurrent.train.trainer import Trainer, train


def _given(corpus, model_dir, *extra):
    return [f"data={corpus}", f"init_from={model_dir}", f"cache_dir={corpus.parent / 'cache'}",
            "batch_size=2", "max_steps=2", "warmup_steps=1", *extra]


def test_the_run_takes_the_saved_models_settings_and_tokenizer(corpus, model_dir, saved):
    mc, tc = load_train_config(None, None, _given(corpus, model_dir, "model.dropout=0.1"))
    assert mc.to_dict() == {**saved[1].config.to_dict(), "dropout": 0.1}
    assert tc.tokenizer == str(model_dir) and tc.init_from == str(model_dir)


def test_the_trainer_starts_from_the_saved_weights(corpus, model_dir, saved, quiet_training):
    torch.manual_seed(1)
    mc, tc = load_train_config(None, None, _given(corpus, model_dir, "seed=1"))
    tok, train_corpus, _ = build_data(tc)
    trainer = Trainer(mc, tc, train_corpus, None, tok, init_from=tc.init_from)
    for name, value in saved[1].state_dict().items():  # seed 1 would draw other weights
        assert torch.equal(trainer.model.state_dict()[name], value), name
    trainer.train_step()
    assert not torch.equal(trainer.model.token_emb.weight, saved[1].token_emb.weight)


def test_a_fine_tuning_run_saves_a_model_of_the_same_shape(corpus, model_dir, tmp_path,
                                                            quiet_training):
    out = tmp_path / "tuned"
    summary = train(*load_train_config(None, None, _given(corpus, model_dir, f"out_dir={out}",
                                                          "eval_tokens=0")))
    assert summary["status"] == "completed"
    assert json.loads((out / "model" / "config.json").read_text()) == \
        json.loads((model_dir / "config.json").read_text())
    assert load_tokenizer(out / "model").vocab_size == load_tokenizer(model_dir).vocab_size
    saved = json.loads((out / "checkpoints" / "step_0000002" / "trainer.json").read_text())
    assert saved["train_config"]["init_from"] == str(model_dir)


@pytest.mark.parametrize("extra, message", [
    (["model.depth=3"], "drop model.depth"),
    (["tokenizer=byte"], "drop tokenizer='byte'"),
    (["baseline=slide"], "drop baseline='slide'"),
])
def test_settings_that_change_the_saved_model_are_refused(corpus, model_dir, extra, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, None, _given(corpus, model_dir, *extra))


def test_a_preset_is_refused_and_a_missing_directory_named(corpus, model_dir, tmp_path):
    with pytest.raises(ValueError, match="drop preset tiny"):
        load_train_config(None, "tiny", _given(corpus, model_dir))
    with pytest.raises(ValueError, match="not a saved model directory"):
        load_train_config(None, None, _given(corpus, tmp_path / "missing"))


def test_a_vocabulary_larger_than_the_tokenizers_is_kept(corpus, tmp_path, quiet_training):
    from blockrecurrent import BlockRecurrentTransformer, preset
    from blockrecurrent.data.tokenizer import ByteTokenizer

    big = tmp_path / "big"
    BlockRecurrentTransformer(preset("tiny", num_tokens=300)).save_pretrained(big)
    ByteTokenizer().save(big)
    out = tmp_path / "out"
    summary = train(*load_train_config(None, None, _given(corpus, big, f"out_dir={out}",
                                                          "eval_tokens=0")))
    assert summary["status"] == "completed"
    assert json.loads((out / "model" / "config.json").read_text())["num_tokens"] == 300


def test_broken_saved_models_are_named_before_any_data_is_read(corpus, model_dir, tmp_path):
    import shutil

    for name, change, message in [
            ("noweights", lambda d: (d / "model.safetensors").unlink(), "holds no weights"),
            ("list", lambda d: (d / "config.json").write_text("[1, 2]"), "a JSON object"),
            ("junk", lambda d: (d / "config.json").write_text("{"), "not a model config")]:
        d = tmp_path / name
        shutil.copytree(model_dir, d)
        change(d)
        with pytest.raises(ValueError, match=message):
            load_train_config(None, None, _given(tmp_path / "no-corpus-needed", d))


def test_tune_state_refuses_init_from(capsys, corpus, model_dir):
    from helpers import run

    code, _, err = run(capsys, "train", "--tune-state", model_dir, f"data={corpus}",
                       f"init_from={model_dir}")
    assert code == 2 and "drop init_from" in err
