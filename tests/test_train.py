"""Tests of the trainer: settings, a short run's outputs, exact resume, truncated backprop through
time, non-finite steps, refusing to overwrite, corrupted checkpoints, 2-process DDP and FSDP
(sharded checkpoints, resharded resume, multi-node), activation checkpointing, torch.compile."""
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from corpora import write_word_corpus

from blockrecurrent import BlockRecurrentTransformer
from blockrecurrent import data as D
from blockrecurrent import train as T


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: much faster on a busy 2-core machine
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), max_words=120)


def settings(corpus, out_dir, *extra, preset="tiny"):
    overrides = [f"data={corpus}", f"out_dir={out_dir}", f"cache_dir={corpus.parent / 'cache'}",
                 "batch_size=4", "max_steps=8", "warmup_steps=2", "lr=3e-3", "log_interval=1",
                 "eval_interval=4", "save_interval=4", "eval_tokens=2000", *extra]
    return T.load_train_config(None, preset, overrides)


def records(out_dir, event):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def tree_digest(path):
    """Hash of every file under path (names and bytes): detects any change."""
    h = hashlib.sha1()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A completed 8-step run (checkpoints at 4 and 8), shared by tests that only read or copy
    it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    torch.set_num_threads(1)
    summary = T.train(*settings(corpus, out, "keep_last=1"))
    return out, summary


# ---------------------------------------------------------------------------------- settings

def test_config_file_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\npreset = "tiny"\ndepth = 3\nrecurrent_layers = [2]\n\n'
                    '[train]\nbatch_size = 2\nlr = 3e-4\nbetas = [0.8, 0.9]\n')
    mc, tc = T.load_train_config(toml, overrides=["model.dim=32", "max_steps=700", "tokenizer=bpe",
                                                  "betas=[0.9, 0.99]", "out_dir=runs/a b",
                                                  "compile=true"])
    assert (mc.dim, mc.depth, mc.recurrent_layers, mc.max_seq_len) == (32, 3, (2,), 64)
    assert (tc.batch_size, tc.lr, tc.max_steps, tc.tokenizer) == (2, 3e-4, 700, "bpe")
    assert tc.betas == (0.9, 0.99) and tc.out_dir == "runs/a b" and tc.compile is True
    # The preset argument beats the file's preset; a model.preset override beats both.
    assert T.load_train_config(toml, preset="small")[0].max_seq_len == 512
    assert T.load_train_config(toml, "small", ["model.preset=tiny"])[0].max_seq_len == 64
    assert T.load_train_config()[0].dim == 256  # default: the small preset

    yaml = tmp_path / "run.yaml"
    yaml.write_text("model:\n  preset: tiny\ntrain:\n  lr: 3e-4\n  betas: [0.8, 0.9]\n")
    mc, tc = T.load_train_config(yaml)  # YAML reads 3e-4 as a string; it becomes a float
    assert mc.dim == 64 and tc.lr == 3e-4 and tc.betas == (0.8, 0.9)

    bad = tmp_path / "bad.toml"
    for text, match in [("[train]\nbogus = 1\n",
                         r"unknown train setting 'bogus'.*valid train settings.*batch_size"),
                        ("[model]\nwidth = 1\n", r"unknown model setting 'width'.*dim"),
                        ("[optim]\nlr = 1\n", r"unknown section.*optim"),
                        ("[train\n", "not valid TOML")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            T.load_train_config(bad)
    with pytest.raises(ValueError, match=r"unknown model setting 'bogus' \(command line\)"):
        T.load_train_config(overrides=["model.bogus=1"])
    with pytest.raises(ValueError, match="key=value"):
        T.load_train_config(overrides=["max_steps"])
    with pytest.raises(ValueError, match="prefix"):
        T.load_train_config(overrides=["optim.lr=1"])
    with pytest.raises(ValueError, match="does not exist"):
        T.load_train_config(tmp_path / "missing.toml")
    (tmp_path / "run.ini").write_text("")
    with pytest.raises(ValueError, match=r"\.toml, \.yaml or \.yml"):
        T.load_train_config(tmp_path / "run.ini")


@pytest.mark.parametrize("overrides, error, match", [
    (["batch_size=0"], ValueError, "batch_size=0"),
    (["lr=-1"], ValueError, "lr=-1.0"),
    (["warmup_steps=20", "max_steps=10"], ValueError, "warmup_steps=20.*max_steps=10"),
    (["min_lr=1", "lr=0.1"], ValueError, "min_lr"),
    (["dtype=float8"], ValueError, "dtype"),
    (["baseline=rnn"], ValueError, "baseline"),
    (["betas=[0.9]"], ValueError, "betas"),
    (["tokenizer=/no/such/dir"], ValueError, "tokenizer"),
    (["batch_size=two"], TypeError, "batch_size must be int"),
    (["compile=1"], TypeError, "compile must be bool"),
    (["parallel=zero"], ValueError, "parallel.*ddp.*fsdp"),
    (["activation_checkpointing=yes"], TypeError, "activation_checkpointing must be bool"),
    (["model.max_seq_len=50"], ValueError, "max_seq_len=50.*multiple of block_width"),
])
def test_impossible_settings(overrides, error, match):
    with pytest.raises(error, match=match):
        T.load_train_config(None, "tiny", overrides)


def test_lr_schedule_and_baselines():
    tc = T.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert T.lr_at(1, tc) == pytest.approx(0.1) and T.lr_at(10, tc) == pytest.approx(1.0)
    assert T.lr_at(60, tc) == pytest.approx(0.55) and T.lr_at(110, tc) == pytest.approx(0.1)
    mc = T.load_train_config(None, "tiny")[0]
    slide = T.apply_baseline(mc, "slide")
    xl = T.apply_baseline(mc, "xl")
    assert slide.recurrent_layers == () and slide.max_seq_len == mc.max_seq_len
    assert xl.recurrent_layers == () and xl.max_seq_len == mc.block_width
    assert T.resolve_model_config(mc, T.TrainConfig(baseline="xl"), 300).num_tokens == 300


def test_bad_corpus_fails_before_any_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no file matches"):
        T.train(*settings(tmp_path / "missing", out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        T.train(*settings(tmp_path / "empty", out))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_text("text")
    (tmp_path / "bin" / "blob.dat").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="blob.dat"):
        T.train(*settings(tmp_path / "bin", out))
    assert not out.exists()
    if not _has("tensorboard"):
        with pytest.raises(ValueError, match="pip install"):
            T.train(*settings(tmp_path / "bin", out, "tensorboard=true"))


def test_small_corpus_fits_warmup_and_lanes_left_unset(tmp_path, capsys):
    """7 files and only data= and max_steps= given: warmup and the lanes fit the run, in one
    line; the same values set explicitly are refused in plain words before any output."""
    (tmp_path / "seven").mkdir()
    corpus = write_word_corpus(tmp_path / "seven", max_words=60, docs=7)
    base = [f"data={corpus}", f"cache_dir={tmp_path / 'cache'}", "max_steps=4", "eval_tokens=0",
            "log_interval=1"]
    mc, tc = T.load_train_config(None, "tiny", [*base, f"out_dir={tmp_path / 'out'}"])
    assert tc.warmup_steps == 1 and tc.unset == {"warmup_steps", "batch_size"}
    summary = T.train(mc, tc)
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
        T.train(*T.load_train_config(None, "tiny", [*base, f"out_dir={out}", "batch_size=8"]))
    with pytest.raises(ValueError, match="warmup_steps=100.*must not exceed max_steps=4"):
        T.load_train_config(None, "tiny", [*base, "warmup_steps=100"])
    assert not out.exists()


def test_eval_tokens_left_unset_fit_a_long_validation_document(tmp_path, capsys):
    """Long files: the default eval_tokens holds no validation document, so the shortest is
    evaluated whole; set explicitly, the clear error stays."""
    (tmp_path / "long").mkdir()
    for i in range(7):
        (tmp_path / "long" / f"{i}.txt").write_text(f"line {i} of a long file\n" * (1500 + 99 * i))
    base = [f"data={tmp_path / 'long'}", f"cache_dir={tmp_path / 'cache'}", "max_steps=1",
            "model.max_seq_len=512"]  # few long segments: a quick evaluation
    summary = T.train(*T.load_train_config(None, "tiny", [*base, f"out_dir={tmp_path / 'o'}"]))
    assert summary["val_bpb"] is not None
    fitted = [line for line in capsys.readouterr().err.splitlines() if "fitted" in line]
    assert len(fitted) == 1 and "the default 32768 holds none" in fitted[0]
    with pytest.raises(ValueError, match="eval_tokens=32768 is smaller than every validation"):
        T.train(*T.load_train_config(None, "tiny", [*base, f"out_dir={tmp_path / 'x'}",
                                                    "eval_tokens=32768"]))


def test_one_file_corpus_trains_with_a_one_line_note(tmp_path, capsys):
    """One file: no validation split, said in one clean line (no warning with its source line)."""
    (tmp_path / "one.txt").write_text("one small document to learn from " * 20)
    summary = T.train(*T.load_train_config(None, "tiny", [
        f"data={tmp_path / 'one.txt'}", f"out_dir={tmp_path / 'out'}", "max_steps=2",
        f"cache_dir={tmp_path / 'cache'}"]))
    err = capsys.readouterr().err
    assert summary["status"] == "completed" and summary["val_loss"] is None
    assert "note: the corpus has too few documents for a validation split" in err
    assert "Warning" not in err and "batch_size=1" in err


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------ a short run

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
    assert isinstance(D.load_tokenizer(out / "model"), D.ByteTokenizer)
    assert (out / "loss.png").stat().st_size > 1000 or not _has("matplotlib")
    opt = torch.load(step / "optimizer.pt", weights_only=True)
    assert all(s["step"] == 8 for s in opt["state"].values())


def test_summary_train_loss_is_the_last_logged_loss(corpus, tmp_path):
    """The summary's train_loss is the mean of the last metrics line (the progress bar's), and
    the last steps are logged even off log_interval."""
    summary = T.train(*settings(corpus, tmp_path / "out", "max_steps=5", "log_interval=3",
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


def test_refuses_to_overwrite_and_checks_resume_settings(corpus, finished):
    out, _ = finished
    before = tree_digest(out)
    with pytest.raises(ValueError, match="already holds a run.*resume"):
        T.train(*settings(corpus, out))
    for extra, match in [(["model.depth=3"], "model settings differ.*depth"),
                         (["batch_size=2"], "batch_size"),
                         (["max_steps=6", "warmup_steps=1"], "beyond max_steps=6"),
                         (["parallel=fsdp"], "parallel='ddp'")]:
        with pytest.raises(ValueError, match=match):
            T.train(*settings(corpus, out, *extra), resume=True)
    assert tree_digest(out) == before
    done = T.train(*settings(corpus, out.parent / "again"), resume=False)
    again = T.train(*settings(corpus, out.parent / "again"), resume=True)  # already at max_steps
    assert again["status"] == "completed" and again["step"] == 8
    assert (again["train_loss"], again["val_bpb"]) == (done["train_loss"], done["val_bpb"])
    with pytest.raises(ValueError, match="nothing to resume"):
        T.train(*settings(corpus, out.parent / "fresh"), resume=True)


def test_resume_takes_the_runs_own_settings(corpus, finished, tmp_path, capsys):
    """`brt train --resume out_dir=X max_steps=10`: the checkpoint's settings (tiny model, its
    schedule and lanes), not the defaults, with only what was given applied; one line says so."""
    from blockrecurrent.cli import main

    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    mc, tc, note = T.load_resume_config(None, None, [f"out_dir={out}", "max_steps=10"])
    want_mc, want_tc = settings(corpus, out, "keep_last=1", "max_steps=10")
    assert mc == T.resolve_model_config(want_mc, want_tc, 257) and tc == want_tc
    assert note == f"resuming {out} from step_0000008 with the settings saved there, except " \
                   "max_steps=10"
    code = main(["train", "--threads", "1", "--resume", f"out_dir={out}", "max_steps=10"])
    err = capsys.readouterr().err
    assert code == 0 and note in err
    assert [r["step"] for r in records(out, "train")] == list(range(1, 11))
    assert T.lr_at(10, tc) == pytest.approx(tc.min_lr)  # the run's schedule ends at step 10
    # Nothing given but out_dir: the saved settings as they are; a model setting that differs
    # from the checkpoint's is still refused.
    assert T.load_resume_config(None, None, [f"out_dir={out}"])[1].max_steps == 10
    assert main(["train", "--resume", f"out_dir={out}", "model.depth=3"]) == 2
    assert "model settings differ" in capsys.readouterr().err


def test_resume_settings_with_a_bad_out_dir_are_a_clear_error(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nout_dir = 5\n")
    with pytest.raises(TypeError, match="out_dir must be str, got int"):
        T.load_resume_config(tmp_path / "bad.toml")


@pytest.mark.parametrize("damage, match", [
    ("optimizer.pt", "optimizer.pt"),
    ("model.safetensors", "model.safetensors"),
    ("lanes_rank0.safetensors", "lanes_rank0.safetensors"),
    ("trainer.json", "trainer.json"),
    ("latest", "names 'step_0000099'"),
])
def test_corrupted_checkpoint_is_a_clear_error(corpus, finished, tmp_path, damage, match):
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    target = out / "checkpoints" / ("latest" if damage == "latest" else f"step_0000008/{damage}")
    if damage == "latest":
        target.write_text("step_0000099\n")
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    before = tree_digest(out)
    with pytest.raises(ValueError, match=match):
        T.train(*settings(corpus, out, "max_steps=12"), resume=True)
    assert tree_digest(out) == before


def test_corrupted_latest_checkpoint_points_at_the_previous_intact_one(corpus, tmp_path):
    out = tmp_path / "out"
    T.train(*settings(corpus, out, "keep_last=0"))  # checkpoints at steps 4 and 8
    ckpts = out / "checkpoints"
    bad = ckpts / "step_0000008" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"optimizer\.pt.*corrupted\. The previous checkpoint "
                                         r".*step_0000004 looks intact: to resume from it, move "
                                         r".*step_0000008 out of .*checkpoints and delete "
                                         r".*latest$"):
        T.train(*settings(corpus, out, "keep_last=0"), resume=True)
    shutil.move(ckpts / "step_0000008", tmp_path / "bad")  # as the message says
    (ckpts / "latest").unlink()
    summary = T.train(*settings(corpus, out, "keep_last=0"), resume=True)
    assert summary["status"] == "completed" and summary["step"] == 8


# ---------------------------------------------------------------------------- exact resume

def test_resume_is_exact(corpus, tmp_path, monkeypatch):
    """Uninterrupted 8 steps == SIGINT at step 3, resume, crash at step 6, resume to 8."""
    ref = tmp_path / "ref"
    T.train(*settings(corpus, ref))
    out = tmp_path / "out"
    mc, tc = settings(corpus, out)
    original = T.Trainer.train_step
    handler = signal.getsignal(signal.SIGINT)

    def interrupt_at_3(self):
        if self.step == 2:  # the signal arrives during step 3: finish it, save, stop
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(T.Trainer, "train_step", interrupt_at_3)
    summary = T.train(mc, tc)
    assert (summary["status"] == "interrupted" and summary["step"] == 3
            and summary["model_dir"] is None)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"

    def crash_at_6(self):
        if self.step == 5:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(T.Trainer, "train_step", crash_at_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.train(mc, tc, resume=True)  # checkpoint at 4, metrics up to 5, crash in 6
    assert records(out, "train")[-1]["step"] == 5
    monkeypatch.setattr(T.Trainer, "train_step", original)
    assert T.train(mc, tc, resume=True)["status"] == "completed"

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
    tok, train_corpus, val_corpus = T.build_data(tc)
    a = T.Trainer(mc, tc, train_corpus, val_corpus, tok)
    for _ in range(2):
        a.train_step()
    state = a.state_dict()
    b = T.Trainer(mc, tc, train_corpus, val_corpus, tok)
    b.load_state_dict(state)
    assert b.step == 2 and b.tokens_seen == a.tokens_seen
    assert [a.train_step()[0] for _ in range(2)] == [b.train_step()[0] for _ in range(2)]


# -------------------------------------------------------------- truncated backprop through time

def test_truncated_backprop_one_graph_per_segment(corpus, monkeypatch):
    mc, tc = settings(corpus, "unused", "grad_accum=3")
    tok, train_corpus, _ = T.build_data(tc)
    trainer = T.Trainer(mc, tc, train_corpus, None, tok)
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
    tok, train_corpus, val_corpus = T.build_data(tc)
    trainer = T.Trainer(T.resolve_model_config(mc, tc, tok.vocab_size), tc, train_corpus,
                        val_corpus, tok)
    assert trainer.model_config.max_seq_len == 16 and trainer.model_config.recurrent_layers == ()
    assert np.isfinite(trainer.train_step()[0]) and np.isfinite(trainer.evaluate()["val_bpb"])
    assert trainer.evaluate() == trainer.evaluate()  # a fixed held-out subset: deterministic


# ------------------------------------------------------------------------- non-finite losses

def _inject_nan(monkeypatch, bad_steps):
    """Make the training loss NaN on the given (1-based) steps."""
    state = {"on": False}
    loss_sum, step = T.lm_loss_sum, T.Trainer.train_step

    def maybe_nan(*args):
        out = loss_sum(*args)
        return out * float("nan") if state["on"] else out

    def flagged_step(self):
        state["on"] = self.step + 1 in bad_steps
        try:
            return step(self)
        finally:
            state["on"] = False

    monkeypatch.setattr(T, "lm_loss_sum", maybe_nan)
    monkeypatch.setattr(T.Trainer, "train_step", flagged_step)


def test_nonfinite_step_is_skipped(corpus, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, {3})
    out = tmp_path / "out"
    summary = T.train(*settings(corpus, out, "max_nonfinite=2"))
    assert summary["status"] == "completed" and summary["nonfinite_skips"] == 1
    assert [r["step"] for r in records(out, "nonfinite")] == [3]
    assert 3 not in [r["step"] for r in records(out, "train")]
    opt = torch.load(out / "checkpoints" / "step_0000008" / "optimizer.pt", weights_only=True)
    assert all(s["step"] == 7 for s in opt["state"].values())  # 8 steps, one without an update


def test_nonfinite_in_a_row_stops_without_saving(corpus, tmp_path, monkeypatch):
    _inject_nan(monkeypatch, set(range(3, 100)))
    out = tmp_path / "out"
    with pytest.raises(T.NonFiniteLossError, match="non-finite for 2 steps in a row.*step_0000002"):
        T.train(*settings(corpus, out, "max_nonfinite=2", "save_interval=2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------ two processes

MULTI = ["max_steps=4", "eval_interval=2", "save_interval=2", "keep_last=0"]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process with the global batch of 4 lanes: what the 2 x 2-lane runs must match."""
    out = tmp_path_factory.mktemp("single") / "out"
    torch.set_num_threads(1)
    T.train(*settings(corpus, out, *MULTI))
    return out


def torchrun(corpus, out, *extra, launch=("--standalone", "--nproc_per_node=2"), timeout=240,
             run=True, program=("-m", "blockrecurrent.train")):
    """`python -m torch.distributed.run LAUNCH PROGRAM` with the tests' settings."""
    args = [f"{k}={v}" for k, v in (("data", corpus), ("out_dir", out),
                                    ("cache_dir", corpus.parent / "cache"))]
    args += ["batch_size=2", "warmup_steps=2", "lr=3e-3", "log_interval=1", "eval_tokens=2000",
             *MULTI, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *program, "--preset", "tiny",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if not run:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_run(got, want, keys=("loss",), exact=False):
    """Same steps, losses (and `keys` of the train records), validation losses and final weights."""
    for event, names in (("train", keys), ("eval", ("val_loss",))):
        a, b = records(got, event), records(want, event)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for k in names:
            if exact:
                assert [r[k] for r in a] == [r[k] for r in b], k
            else:
                assert [r[k] for r in a] == pytest.approx([r[k] for r in b], rel=1e-5), k
    assert ([r["tokens"] for r in records(got, "train")]
            == [r["tokens"] for r in records(want, "train")])
    a = BlockRecurrentTransformer.from_pretrained(got / "model").state_dict()
    b = BlockRecurrentTransformer.from_pretrained(want / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5)


def test_two_processes_match_one_with_the_same_global_batch(corpus, single, tmp_path):
    ddp = tmp_path / "ddp"
    proc = torchrun(corpus, ddp)
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["status"] == "completed"  # printed once
    assert_same_run(ddp, single, keys=("loss", "grad_norm"))
    step = ddp / "checkpoints" / "step_0000004"
    assert all((step / f"lanes_rank{r}.{ext}").is_file()
               for r in (0, 1) for ext in ("json", "safetensors"))
    lanes = [json.loads((step / f"lanes_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["config"]["rank"] for s in lanes] == [0, 1]


def _resume_from_step_2(run, dest):
    """A copy of `run` as an interruption right after the step-2 checkpoint leaves it (its later
    metrics lines included: the resume drops them)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step_0000004")
    shutil.rmtree(dest / "model")
    (dest / "checkpoints" / "latest").write_text("step_0000002\n")
    return dest


def test_fsdp_matches_one_process_and_resumes_resharded(corpus, single, tmp_path):
    """2-process FSDP (with activation checkpointing) == 1 process with the global batch: the
    gradient norms (before clipping) catch gradients summed over ranks instead of averaged; Adam
    alone would hide a factor 2. A 2-process run interrupted by SIGINT in step 3 (it finishes
    the step and saves) and resumed equals the uninterrupted run bit for bit; the sharded step-2
    checkpoint also resumes, resharded, with 1 process holding all 4 lanes."""
    fsdp = tmp_path / "fsdp"
    torchrun(corpus, fsdp, "parallel=fsdp", "activation_checkpointing=true")
    assert_same_run(fsdp, single, keys=("loss", "grad_norm"))
    step = fsdp / "checkpoints" / "step_0000004"
    assert ((step / "dcp" / ".metadata").is_file()
            and len(list((step / "dcp").glob("*.distcp"))) == 2)
    assert not (step / "model.safetensors").exists()  # the weights are in the shards
    assert all((step / f"{name}_rank{r}.{ext}").is_file() for r in (0, 1)
               for name, ext in (("lanes", "json"), ("lanes", "safetensors"), ("rng", "pt")))
    assert json.loads((step / "trainer.json").read_text())["world_size"] == 2

    two = tmp_path / "two"
    proc = torchrun(corpus, two, "parallel=fsdp", "activation_checkpointing=true",
                    program=(os.path.join(os.path.dirname(__file__), "interrupt_run.py"), "3"))
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (summary["status"], summary["step"], summary["model_dir"]) == ("interrupted", 3, None)
    assert (two / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    torchrun(corpus, two, "parallel=fsdp", "activation_checkpointing=true", "--resume")
    assert_same_run(two, fsdp, keys=("loss", "grad_norm"), exact=True)

    one = _resume_from_step_2(fsdp, tmp_path / "one")
    mc, tc = settings(corpus, one, *MULTI, "parallel=fsdp")  # batch_size=4: 1 x 4 lanes = 2 x 2
    with pytest.raises(ValueError, match="2 processes x batch_size 2.*1 x 2"):
        T.train(mc, dataclasses.replace(tc, batch_size=2), resume=True)
    assert T.train(mc, tc, resume=True)["status"] == "completed"
    assert_same_run(one, fsdp, keys=("loss", "grad_norm"))
    lanes = json.loads((one / "checkpoints" / "step_0000004" / "lanes_rank0.json").read_text())
    assert lanes["config"]["world_size"] == 1 and len(lanes["pos"]) == 4
    meta = one / "checkpoints" / "step_0000004" / "dcp" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:100])
    before = tree_digest(one)
    with pytest.raises(ValueError, match=r"cannot read .*step_0000004/dcp"):
        T.train(*settings(corpus, one, *MULTI, "parallel=fsdp", "max_steps=6"), resume=True)
    assert tree_digest(one) == before


def test_two_nodes_over_loopback_match_one_node(corpus, single, tmp_path):
    """Two torchrun launches (two "nodes", one process each) meeting at a c10d rendezvous on
    127.0.0.1, as the README's multi-node command does across machines."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "nodes"
    launch = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=brt-test"]
    procs = [torchrun(corpus, out, "parallel=fsdp", launch=launch, run=False) for _ in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
        # Both nodes' logs: when one node's worker fails, the other only sees the store close.
        assert [p.returncode for p in procs] == [0, 0], "\n\n".join(e[-3000:] for e in errs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert_same_run(out, single, keys=("loss", "grad_norm"))


# -------------------------------------------------------------- activation checkpointing, compile

def _losses(corpus, *extra, steps=3):
    mc, tc = settings(corpus, "unused", *extra)
    tok, train_corpus, _ = T.build_data(tc)
    trainer = T.Trainer(mc, tc, train_corpus, None, tok)
    losses = [trainer.train_step()[0] for _ in range(steps)]
    return losses, trainer.model.state_dict()


def test_activation_checkpointing_gives_the_same_steps(corpus):
    # Dropout on: the recomputed forward must draw the same masks.
    want, w_want = _losses(corpus, "model.dropout=0.1", "grad_accum=2")
    got, w_got = _losses(corpus, "model.dropout=0.1", "grad_accum=2",
                         "activation_checkpointing=true")
    assert got == pytest.approx(want, rel=1e-6)
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_gives_the_same_losses(corpus):
    want, _ = _losses(corpus, steps=4)
    got, _ = _losses(corpus, "compile=true", steps=4)
    assert got == pytest.approx(want, rel=1e-4)
