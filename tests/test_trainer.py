"""train/trainer.py: a short run's outputs, exact resume, truncated backprop through time,
non-finite steps, torch.compile. (Settings: test_settings; checkpoints: test_checkpoint; several
processes and activation checkpointing: test_distributed.)"""
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from helpers import records, settings, step_losses, write_word_corpus

from blockrecurrent.data.tokenizer import ByteTokenizer, load_tokenizer
from blockrecurrent.errors import NonFiniteLossError
from blockrecurrent.model.transformer import BlockRecurrentTransformer
from blockrecurrent.train.optim import lm_loss_sum, lr_at
from blockrecurrent.train.resume import load_resume_config
from blockrecurrent.train.settings import load_train_config, resolve_model_config
from blockrecurrent.train.train_data import build_data
from blockrecurrent.train.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("quiet_training")


def test_bad_corpus_fails_before_any_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no file matches"):
        train(*settings(tmp_path / "missing", out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        train(*settings(tmp_path / "empty", out))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_text("text")
    (tmp_path / "bin" / "blob.dat").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="blob.dat"):
        train(*settings(tmp_path / "bin", out))
    assert not out.exists()
    if not _has("tensorboard"):
        with pytest.raises(ValueError, match="pip install"):
            train(*settings(tmp_path / "bin", out, "tensorboard=true"))


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------------- a short run

def test_run_writes_metrics_checkpoints_and_model(finished):
    out, summary = finished
    assert summary["status"] == "completed" and summary["step"] == 8
    train_recs, evals = records(out, "train"), records(out, "eval")
    assert ([r["step"] for r in train_recs] == list(range(1, 9))
            and [r["step"] for r in evals] == [4, 8])
    for key in ("loss", "lr", "tokens", "tokens_per_s", "padding_fraction", "time"):
        assert key in train_recs[0]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5  # it learns
    assert summary["val_loss"] == evals[-1]["val_loss"] and 0 < evals[-1]["val_bpb"] < 9
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000008"]  # keep_last=1
    assert (ckpts / "latest").read_text().strip() == "step_0000008"
    step = ckpts / "step_0000008"
    umask = os.umask(0o022)
    os.umask(umask)  # temporary files are private; the renamed results get the usual modes
    assert step.stat().st_mode & 0o777 == 0o777 & ~umask
    assert ((ckpts / "latest").stat().st_mode & 0o777
            == (step / "trainer.json").stat().st_mode & 0o777 == 0o666 & ~umask)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "trainer.json",
                 "optimizer.pt", "lanes_rank0.json", "lanes_rank0.safetensors", "rng_rank0.pt"):
        assert (step / name).is_file(), name
    final = BlockRecurrentTransformer.from_pretrained(out / "model")
    from_ckpt = BlockRecurrentTransformer.from_pretrained(step)
    for (k, a), b in zip(final.state_dict().items(), from_ckpt.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert isinstance(load_tokenizer(out / "model"), ByteTokenizer)
    assert (out / "loss.png").stat().st_size > 1000 or not _has("matplotlib")
    opt = torch.load(step / "optimizer.pt", weights_only=True)
    assert all(s["step"] == 8 for s in opt["state"].values())


# -------------------------------------------------------------------------------- exact resume

def test_resume_is_exact(corpus, tmp_path, monkeypatch):
    """Uninterrupted 8 steps == SIGINT at step 3, resume, crash at step 6, resume to 8."""
    ref = tmp_path / "ref"
    train(*settings(corpus, ref))
    out = tmp_path / "out"
    mc, tc = settings(corpus, out)
    original = Trainer.train_step
    handler = signal.getsignal(signal.SIGINT)

    def interrupt_at_3(self):
        if self.step == 2:  # the signal arrives during step 3: finish it, save, stop
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_3)
    summary = train(mc, tc)
    assert (summary["status"] == "interrupted" and summary["step"] == 3
            and summary["model_dir"] is None)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"

    def crash_at_6(self):
        if self.step == 5:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(mc, tc, resume=True)  # checkpoint at 4, metrics up to 5, crash in 6
    assert records(out, "train")[-1]["step"] == 5
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train(mc, tc, resume=True)["status"] == "completed"

    for event, key in (("train", "loss"), ("eval", "val_loss")):
        got, want = records(out, event), records(ref, event)
        # Logs past step 4 were dropped.
        assert [r["step"] for r in got] == [r["step"] for r in want]
        assert [r[key] for r in got] == [r[key] for r in want]  # bit-exact
    a = BlockRecurrentTransformer.from_pretrained(out / "model").state_dict()
    b = BlockRecurrentTransformer.from_pretrained(ref / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_dict_round_trip(corpus):
    mc, tc = settings(corpus, "unused", "grad_accum=2")
    tok, train_corpus, val_corpus = build_data(tc)
    a = Trainer(mc, tc, train_corpus, val_corpus, tok)
    for _ in range(2):
        a.train_step()
    state = a.state_dict()
    b = Trainer(mc, tc, train_corpus, val_corpus, tok)
    b.load_state_dict(state)
    assert b.step == 2 and b.tokens_seen == a.tokens_seen
    assert [a.train_step()[0] for _ in range(2)] == [b.train_step()[0] for _ in range(2)]


# ------------------------------------------------------------- truncated backprop through time

def test_truncated_backprop_one_graph_per_segment(corpus, monkeypatch):
    mc, tc = settings(corpus, "unused", "grad_accum=3")
    tok, train_corpus, _ = build_data(tc)
    trainer = Trainer(mc, tc, train_corpus, None, tok)
    calls, backwards = [], []
    model = trainer.train_model

    def spy(seq, xl_memories=None, states=None, reset=None):
        carried = [] if states is None else [states, *xl_memories.keys, *xl_memories.values]
        calls.append(all(t.grad_fn is None and not t.requires_grad for t in carried))
        return model(seq, xl_memories=xl_memories, states=states, reset=reset)

    real_backward = torch.Tensor.backward

    def counting_backward(self, *args, **kwargs):
        backwards.append(len(calls))
        return real_backward(self, *args, **kwargs)

    trainer.train_model = spy
    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    for _ in range(2):
        trainer.train_step()
    # One backward per segment, right after its forward; carried state never holds a graph.
    assert backwards == [1, 2, 3, 4, 5, 6] and calls == [True] * 6
    assert trainer.states.grad_fn is None and trainer.mems.keys[0].grad_fn is None


def test_xl_baseline_trains(corpus):
    mc, tc = settings(corpus, "unused", "baseline=xl")
    tok, train_corpus, val_corpus = build_data(tc)
    trainer = Trainer(resolve_model_config(mc, tc, tok.vocab_size), tc, train_corpus,
                      val_corpus, tok)
    assert trainer.model_config.max_seq_len == 16 and trainer.model_config.recurrent_layers == ()
    assert np.isfinite(trainer.train_step()[0]) and np.isfinite(trainer.evaluate()["val_bpb"])
    assert trainer.evaluate() == trainer.evaluate()  # a fixed held-out subset: deterministic


# --------------------------------------------------------------------------- non-finite losses

def _inject_nan(monkeypatch, bad_steps):
    """Make the training loss NaN on the given (1-based) steps."""
    state = {"on": False}
    loss_sum, step = lm_loss_sum, Trainer.train_step

    def maybe_nan(*args):
        out = loss_sum(*args)
        return out * float("nan") if state["on"] else out

    def flagged_step(self):
        state["on"] = self.step + 1 in bad_steps
        try:
            return step(self)
        finally:
            state["on"] = False

    monkeypatch.setattr("blockrecurrent.train.trainer.lm_loss_sum", maybe_nan)  # where it is called
    monkeypatch.setattr(Trainer, "train_step", flagged_step)


def test_nonfinite_step_is_skipped(corpus, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, {3})
    out = tmp_path / "out"
    summary = train(*settings(corpus, out, "max_nonfinite=2"))
    assert summary["status"] == "completed" and summary["nonfinite_skips"] == 1
    assert [r["step"] for r in records(out, "nonfinite")] == [3]
    assert 3 not in [r["step"] for r in records(out, "train")]
    opt = torch.load(out / "checkpoints" / "step_0000008" / "optimizer.pt", weights_only=True)
    assert all(s["step"] == 7 for s in opt["state"].values())  # 8 steps, one without an update


def test_nonfinite_in_a_row_stops_without_saving(corpus, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, set(range(3, 100)))
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 steps in a row.*step_0000002"):
        train(*settings(corpus, out, "max_nonfinite=2", "save_interval=2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------- torch.compile

@pytest.mark.slow
def test_compile_gives_the_same_losses(corpus):
    want, _ = step_losses(corpus, steps=4)
    got, _ = step_losses(corpus, "compile=true", steps=4)
    assert got == pytest.approx(want, rel=1e-4)


# --- fitted settings, resume from a run's own settings, saved files (the first hour) --------

def test_small_corpus_fits_warmup_and_lanes_left_unset(tmp_path, capsys):
    """7 files and only data= and max_steps= given: warmup and the lanes fit the run, in one
    line; the same values set explicitly are refused in plain words before any output."""
    (tmp_path / "seven").mkdir()
    corpus = write_word_corpus(tmp_path / "seven", max_words=60, docs=7)
    base = [f"data={corpus}", f"cache_dir={tmp_path / 'cache'}", "max_steps=4", "eval_tokens=0",
            "log_interval=1"]
    mc, tc = load_train_config(None, "tiny", [*base, f"out_dir={tmp_path / 'out'}"])
    assert tc.warmup_steps == 1 and tc.unset == {"warmup_steps", "batch_size"}
    summary = train(mc, tc)
    assert summary["status"] == "completed" and summary["step"] == 4
    err = capsys.readouterr().err
    fitted = [line for line in err.splitlines() if line.startswith("fitted to this run")]
    assert len(fitted) == 1 and "warmup_steps=1" in fitted[0] and "batch_size=5" in fitted[0]
    saved = json.loads((tmp_path / "out" / "checkpoints" / "step_0000004" / "trainer.json")
                       .read_text())["train_config"]
    assert (saved["batch_size"], saved["warmup_steps"]) == (5, 1)
    out = tmp_path / "strict"
    with pytest.raises(ValueError, match=r"batch_size=8 asks for 8 batch rows.*only 5 "
                                         r"documents.*lower batch_size.*\(batch_size=5 fits\)"):
        train(*load_train_config(None, "tiny", [*base, f"out_dir={out}", "batch_size=8"]))
    with pytest.raises(ValueError, match="warmup_steps=100.*must not exceed max_steps=4"):
        load_train_config(None, "tiny", [*base, "warmup_steps=100"])
    assert not out.exists()


def test_eval_tokens_left_unset_fit_a_long_validation_document(tmp_path, capsys):
    """Long files: the default eval_tokens holds no validation document, so the shortest is
    evaluated whole; set explicitly, prefixes of the first documents are, said in one line."""
    (tmp_path / "long").mkdir()
    for i in range(7):
        (tmp_path / "long" / f"{i}.txt").write_text(f"line {i} of a long file\n" * (1500 + 99 * i))
    base = [f"data={tmp_path / 'long'}", f"cache_dir={tmp_path / 'cache'}", "max_steps=1",
            "model.max_seq_len=512"]  # few long segments: a quick evaluation
    summary = train(*load_train_config(None, "tiny", [*base, f"out_dir={tmp_path / 'o'}"]))
    assert summary["val_bpb"] is not None
    fitted = [line for line in capsys.readouterr().err.splitlines() if "fitted" in line]
    assert len(fitted) == 1 and "the default 32768 holds none" in fitted[0]
    summary = train(*load_train_config(None, "tiny", [*base, f"out_dir={tmp_path / 'x'}",
                                                          "eval_tokens=20000"]))
    assert summary["val_bpb"] is not None
    lines = [line for line in capsys.readouterr().err.splitlines() if "prefixes" in line]
    assert lines == ["eval_tokens=20000 holds no whole validation document: each evaluation "
                     "scores the first 20,000 tokens (bos included) of 1 of the 1 (prefixes; "
                     "bits per byte over the bytes they hold)"]


def test_one_file_corpus_trains_with_a_one_line_note(tmp_path, capsys):
    """One file: no validation split, said in one clean line (no warning with its source line)."""
    (tmp_path / "one.txt").write_text("one small document to learn from " * 20)
    summary = train(*load_train_config(None, "tiny", [
        f"data={tmp_path / 'one.txt'}", f"out_dir={tmp_path / 'out'}", "max_steps=2",
        f"cache_dir={tmp_path / 'cache'}"]))
    err = capsys.readouterr().err
    assert summary["status"] == "completed" and summary["val_loss"] is None
    assert "note: the corpus has too few documents for a validation split" in err
    assert "Warning" not in err and "batch_size=1" in err


def test_summary_train_loss_is_the_last_logged_loss(corpus, tmp_path):
    """The summary's train_loss is the mean of the last metrics line (the progress bar's), and
    the last steps are logged even off log_interval."""
    summary = train(*settings(corpus, tmp_path / "out", "max_steps=5", "log_interval=3",
                                "eval_interval=0", "save_interval=0", "eval_tokens=0"))
    logged = records(tmp_path / "out", "train")
    assert [r["step"] for r in logged] == [3, 5]
    assert summary["train_loss"] == logged[-1]["loss"]


def test_saved_weights_and_lanes_get_the_usual_mode(finished):
    """Not safetensors' private 0600: others on a shared machine can load the model."""
    out, _ = finished
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out / "model" / "model.safetensors",
                 out / "checkpoints" / "step_0000008" / "model.safetensors",
                 out / "checkpoints" / "step_0000008" / "lanes_rank0.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_resume_takes_the_runs_own_settings(corpus, finished, tmp_path, capsys):
    """`brt train --resume out_dir=X max_steps=10`: the checkpoint's settings (tiny model, its
    schedule and lanes), not the defaults, with only what was given applied; one line says so."""
    from blockrecurrent.cli import main

    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    mc, tc, note = load_resume_config(None, None, [f"out_dir={out}", "max_steps=10"])
    want_mc, want_tc = settings(corpus, out, "keep_last=1", "max_steps=10")
    assert mc == resolve_model_config(want_mc, want_tc, 257) and tc == want_tc
    assert note == f"resuming {out} from step_0000008 with the settings saved there, except " \
                   "max_steps=10"
    code = main(["train", "--threads", "1", "--resume", f"out_dir={out}", "max_steps=10"])
    err = capsys.readouterr().err
    assert code == 0 and note in err
    assert [r["step"] for r in records(out, "train")] == list(range(1, 11))
    assert lr_at(10, tc) == pytest.approx(tc.min_lr)  # the run's schedule ends at step 10
    # Nothing given but out_dir: the saved settings as they are; a model setting that differs
    # from the checkpoint's is still refused.
    assert load_resume_config(None, None, [f"out_dir={out}"])[1].max_steps == 10
    assert main(["train", "--resume", f"out_dir={out}", "model.depth=3"]) == 2
    assert "model settings differ" in capsys.readouterr().err


def test_resume_settings_with_a_bad_out_dir_are_a_clear_error(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nout_dir = 5\n")
    with pytest.raises(TypeError, match="out_dir must be str, got int"):
        load_resume_config(tmp_path / "bad.toml")


def test_corrupted_latest_checkpoint_points_at_the_previous_intact_one(corpus, tmp_path):
    out = tmp_path / "out"
    train(*settings(corpus, out, "keep_last=0"))  # checkpoints at steps 4 and 8
    ckpts = out / "checkpoints"
    bad = ckpts / "step_0000008" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"optimizer\.pt.*corrupted\. The previous checkpoint "
                                         r".*step_0000004 looks intact: to resume from it, move "
                                         r".*step_0000008 out of .*checkpoints and delete "
                                         r".*latest$"):
        train(*settings(corpus, out, "keep_last=0"), resume=True)
    shutil.move(ckpts / "step_0000008", tmp_path / "bad")  # as the message says
    (ckpts / "latest").unlink()
    summary = train(*settings(corpus, out, "keep_last=0"), resume=True)
    assert summary["status"] == "completed" and summary["step"] == 8
