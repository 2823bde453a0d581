"""cli.py, the `brt` command line: --help of every subcommand, eval and generate on a saved tiny
model, user errors exit 2 with a one-line message, probe. (`brt run`: test_report; `brt compare`:
test_compare.)"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import run, tiny_config

from blockrecurrent.cli import main
from blockrecurrent.cli.parser import build_parser
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.model.transformer import BlockRecurrentTransformer

COMMANDS = ("train", "eval", "generate", "serve", "compare", "bench", "probe", "passkey", "run")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_subcommand(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"usage: brt {command}" in out
    # Every option is described (argparse prints a help line under or beside each).
    sub = build_parser(with_bench=True)._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings:
            assert action.help, f"brt {command} {action.option_strings} has no help text"


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in COMMANDS)
    code, _, err = run(capsys)  # no command
    assert code == 2 and "error:" in err


def test_eval_writes_json_and_png(capsys, model_dir, corpus_dir, tmp_path):
    code, out, err = run(capsys, "eval", model_dir, "--data", corpus_dir, "--split", "val",
                         "--batch-size", "2", "--cache-dir", tmp_path / "cache",
                         "--out", tmp_path / "out")
    assert code == 0, err
    assert "bits per byte:" in out and "[0, 1k)" in out
    res = json.loads((tmp_path / "out" / "eval-val.json").read_text())
    assert res["split"] == "val" and res["tokens"] > 0 and res["bits_per_byte"] > 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "eval-val.png").is_file()
    # A second run reads the tokenized documents from the cache and agrees.
    code, _, _ = run(capsys, "eval", model_dir, "--data", corpus_dir, "--split", "val",
                     "--batch-size", "2", "--cache-dir", tmp_path / "cache",
                     "--out", tmp_path / "out2")
    again = json.loads((tmp_path / "out2" / "eval-val.json").read_text())
    assert code == 0 and again["bits_per_byte"] == pytest.approx(res["bits_per_byte"])


def test_eval_says_what_it_reads_before_reading_it(capsys, model_dir, corpus_dir, tmp_path):
    """Up front: the split, its size and the caps that read less; then a progress bar."""
    argv = ["eval", model_dir, "--data", corpus_dir, "--split", "val", "--val-fraction", "0.2",
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", "--threads", "1"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith(("reading", "evaluating"))]
    res = json.loads((tmp_path / "out" / "eval-val.json").read_text())
    assert lines == [f"reading the val split of {str(corpus_dir)!r}",
                     f"evaluating all {res['documents']} documents of the val split of "
                     f"{str(corpus_dir)!r}: {res['tokens']:,} tokens, {res['bytes']:,} bytes; "
                     "--max-tokens N or --max-docs N evaluate fewer"]
    assert "eval val" in err and res["documents"] > 1  # the progress bar
    code, out, err = run(capsys, *argv, "--max-docs", "1")
    assert code == 0 and f"evaluating 1 of the {res['documents']} documents" in err
    assert "(--max-docs 1): " in err and "val split: 1 document, " in out  # not "1 documents"


def test_generate(capsys, model_dir, tmp_path):
    code, out, err = run(capsys, "generate", model_dir, "--prompt", "def f(", "--max-new-tokens",
                         "8", "--temperature", "0.8", "--top-k", "20", "--seed", "0")
    assert code == 0, err
    assert "prefill:" in err
    # The same seed gives the same text.
    code, same, _ = run(capsys, "generate", model_dir, "--prompt", "def f(", "--max-new-tokens",
                        "8", "--temperature", "0.8", "--top-k", "20", "--seed", "0")
    assert code == 0 and same == out
    # Greedy from a prompt file prints what the model's own greedy decoding gives after bos +
    # the prompt, stopping where the model starts a new document.
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import os\n")
    code, again, _ = run(capsys, "generate", model_dir, "--prompt-file", prompt,
                         "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0
    tok = ByteTokenizer()
    model = BlockRecurrentTransformer.from_pretrained(model_dir)
    ids = model.generate([tok.bos_id] + tok.encode("import os\n"), 8, do_sample=False)[0].tolist()
    ids = ids[:ids.index(tok.bos_id)] if tok.bos_id in ids else ids
    expected = tok.decode(ids)
    assert again == expected + ("" if expected.endswith("\n") or not expected else "\n")


def test_interrupted_generation_ends_its_line(model_dir):
    """Ctrl-C while printing: the text's line is ended, so 'interrupted' starts a line."""
    import io

    from blockrecurrent.generate.text import generate_text

    class InterruptedOut(io.StringIO):
        interrupted = False

        def write(self, text):  # Ctrl-C once, in the middle of a line
            if not self.interrupted and len(self.getvalue()) >= 3 \
                    and not self.getvalue().endswith("\n"):
                self.interrupted = True
                raise KeyboardInterrupt
            return super().write(text)

    out = InterruptedOut()
    with pytest.raises(KeyboardInterrupt):
        generate_text(model_dir, prompt="x", max_new_tokens=50, temperature=0, out=out,
                      err=io.StringIO())
    assert len(out.getvalue()) >= 3 and out.getvalue().endswith("\n")


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}/missing"], "checkpoint directory"),
    (["eval", "{model}", "--data", "{tmp}/no/such/corpus"], "no file matches"),
    (["eval", "{model}", "--batch-size", "0"], "must be >= 1"),
    (["eval", "{model}", "--split", "train"], "invalid choice"),
    (["generate", "{tmp}/missing", "--prompt", "x"], "is not a saved model"),
    (["generate", "{model}", "--prompt", "x", "--prompt-file", "p.txt"], "not allowed with"),
    (["generate", "{model}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "{model}", "--prompt-file", "{tmp}/missing.txt"], "does not exist"),
    (["generate", "{model}", "--prompt-file", "{tmp}"], "is a directory"),
    (["generate", "{model}", "--prompt-file", "{tmp}/latin1.txt"],
     "latin1.txt' is not UTF-8 text (invalid continuation byte at byte 1)"),
    (["generate", "{tmp}/run", "--prompt", "x"], "holds a training run, whose model is"),
    (["generate", "{tmp}/unfinished", "--prompt", "x"],
     "latest checkpoint {tmp}/unfinished/checkpoints/step_0000020 is a saved model too"),
    (["generate", "{model}", "--prompt", "x", "--device", "cuda:99"], "CUDA GPU"),
    (["eval", "{model}", "--device", "nodevice"], "unknown device 'nodevice'"),
    (["train", "max_steps"], "key=value"),
    (["run", "=3"], "key=value"),
])
def test_user_errors_exit_2_with_a_message(capsys, model_dir, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path, model=model_dir) for a in argv]
    message = message.format(tmp=tmp_path, model=model_dir)
    (tmp_path / "latin1.txt").write_bytes("déjà vu".encode("latin-1"))
    (tmp_path / "run" / "model").mkdir(parents=True)  # a training run's out_dir
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    for step in ("step_0000010", "step_0000020"):  # a run stopped before its model's export
        (tmp_path / "unfinished" / "checkpoints" / step).mkdir(parents=True)
        (tmp_path / "unfinished" / "checkpoints" / step / "config.json").write_text("{}")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "error:" in err and message in err and "Traceback" not in err


def test_unknown_training_setting_exits_2(capsys, tmp_path):
    pytest.importorskip("blockrecurrent.train")
    code, _, err = run(capsys, "train", "no_such_field=1", f"out_dir={tmp_path}")
    assert code == 2 and "error:" in err and "no_such_field" in err
    code, _, err = run(capsys, "train", "model.no_such_field=1", f"out_dir={tmp_path}")
    assert code == 2 and "no_such_field" in err


def test_top_level_help_does_not_import_torch():
    """`brt --help` answers at once: the package imports its torch modules on first use."""
    code = ("import sys; from blockrecurrent.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from blockrecurrent import BlockRecurrentTransformer, preset; "
            "assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_traceback_flag_reraises(model_dir, tmp_path):
    with pytest.raises(ValueError, match="checkpoint directory"):
        main(["--traceback", "eval", str(tmp_path / "missing")])


def test_internal_bugs_keep_their_traceback(capsys, model_dir, monkeypatch):
    """A TypeError from our own check is one line and exit 2; one from a bug (here a broken
    evaluate_checkpoint) propagates, so the console script prints its traceback."""
    code, _, err = run(capsys, "train", "batch_size=1.5")
    assert code == 2 and "error: train setting batch_size must be int" in err

    def broken(*args, **kwargs):
        return len(None)  # TypeError raised by Python, not by a check of ours

    import blockrecurrent.evaluate.evaluation

    monkeypatch.setattr(blockrecurrent.evaluate.evaluation, "evaluate_checkpoint", broken)
    with pytest.raises(TypeError, match="NoneType"):
        main(["eval", str(model_dir)])
    assert "error:" not in capsys.readouterr().err


def test_settings_may_follow_options(capsys):
    """key=value settings before and after an option are all kept, in order."""
    args, extra = build_parser(False).parse_known_args(["train", "a=1", "--resume", "b=2"])
    assert args.overrides == ["a=1"] and extra == ["b=2"]  # what argparse alone does
    code, _, err = run(capsys, "train", "--preset", "tiny", "--resume", "no_such_field=1")
    assert code == 2 and "no_such_field" in err and "unrecognized" not in err
    code, _, err = run(capsys, "train", "--preset", "tiny", "--resume", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err


def test_failed_and_interrupted_runs_exit_with_a_one_line_message(capsys, tmp_path, corpus_dir,
                                                                  monkeypatch):
    """A diverging run exits 2 with 'training diverged' (no traceback); an interrupted one 130."""
    monkeypatch.setattr("blockrecurrent.train.trainer.lm_loss_sum",
                        lambda *a: torch.tensor(float("nan"), requires_grad=True))
    config = tiny_config(tmp_path, corpus_dir)
    code, _, err = run(capsys, "train", "--threads", "1", "--config", config,
                       f"out_dir={tmp_path / 'nan'}", "max_nonfinite=1")
    assert code == 2 and "\nerror: training diverged: " in err and "Traceback" not in err
    monkeypatch.undo()
    monkeypatch.setattr("blockrecurrent.train.trainer.train",
                        lambda *a, **k: {"status": "interrupted", "step": 1})
    code, _, err = run(capsys, "train", "--threads", "1", "--config", config,
                       f"out_dir={tmp_path / 'stop'}")
    assert code == 130 and "--resume" in err


def test_probe_command(capsys, tmp_path):
    """brt probe trains both models on a tiny setting, writes the report, and evaluates a saved
    model; bad settings exit 2 before any training."""
    out = tmp_path / "probe"
    code, stdout, err = run(capsys, "probe", "--threads", "1", "--keys", "1", "--distances", "3",
                            "--lead", "1", "--steps", "3", "--beyond", "4", "--save-models",
                            "--out", out, "block_width=8", "num_state_vectors=8", "gate=lstm")
    assert code == 0, err
    assert "recurrent K=1" in stdout and (out / "probe.md").is_file()
    assert "beyond the trained distance D" in stdout and "0 (12)" not in stdout.split("D:")[0]
    rows = json.loads((out / "probe.json").read_text())
    assert [(r["model"], r["distance"]) for r in rows] == [
        ("recurrent", 3), ("recurrent", 12), ("slide", 3), ("slide", 12)]
    assert rows[0]["steps"] == 3
    saved = out / "models" / "recurrent-keys-K1-d3-s0"
    assert json.loads((saved / "config.json").read_text())["gate"] == "lstm"
    code, stdout, err = run(capsys, "probe", "--threads", "1", "--model", saved, "--keys", "1",
                            "--distances", "2", "3", "--out", tmp_path / "eval")
    assert code == 0, err
    assert len(json.loads((tmp_path / "eval" / "probe.json").read_text())) == 2
    code, _, err = run(capsys, "probe", "--out", tmp_path / "bad", "gatee=lstm")
    assert code == 2 and "unknown model setting 'gatee'" in err
    code, _, err = run(capsys, "probe", "--keys", "20", "--out", tmp_path / "bad")
    assert code == 2 and "do not fit" in err


def test_eval_reads_the_training_corpus_from_the_run(capsys, tmp_path, corpus_dir):
    """`brt eval out_dir/model` finds the corpus in the run's trainer.json: no --data needed."""
    train_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--threads", "1", "--config",
                       tiny_config(tmp_path, corpus_dir), f"out_dir={train_dir}")
    assert code == 0, err
    code, out, err = run(capsys, "eval", train_dir / "model", "--threads", "1",
                         "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert f"data: {str(corpus_dir)!r}" in out
    assert (train_dir / "model" / "eval" / "eval-test.json").is_file()


def test_warnings_print_in_one_line(capsys, model_dir, monkeypatch):
    """A warning (no matplotlib, say) is `warning: <message>`, without a source line."""
    import warnings

    import blockrecurrent.generate.text

    def warns(*args, **kwargs):
        warnings.warn("matplotlib is not installed, so no plot", stacklevel=2)

    monkeypatch.setattr(blockrecurrent.generate.text, "generate_text", warns)
    code, _, err = run(capsys, "generate", model_dir)
    assert code == 0 and err == "warning: matplotlib is not installed, so no plot\n"
    assert warnings.showwarning.__name__ != "_warning_in_one_line"  # restored after main()
