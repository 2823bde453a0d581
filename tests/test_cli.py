"""The `brt` command line: --help of every subcommand, eval and generate on a saved tiny model,
user errors exit 2 with a one-line message, and a tiny end-to-end main job."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.cli import build_parser, main
from blockrecurrent.data import ByteTokenizer
from blockrecurrent.errors import is_expected

COMMANDS = ("train", "eval", "generate", "compare", "bench", "probe", "run")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    BlockRecurrentTransformer(preset("tiny")).save_pretrained(d)
    ByteTokenizer().save(d)
    return d


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """40 small text files: every split (5% val, 5% test) gets at least one."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (d / f"f{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}  # é\n" * (1 + i % 7))
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


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

    from blockrecurrent.text import generate_text

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


def test_missing_modules_of_ours_are_bugs():
    """A missing optional package is one line; a missing module of this package is a bug."""
    assert is_expected(ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval"))
    assert not is_expected(ModuleNotFoundError("No module named 'blockrecurrent.gone'",
                                               name="blockrecurrent.gone"))
    assert is_expected(ModuleNotFoundError("No module named 'blockrecurrent_extras'",
                                           name="blockrecurrent_extras"))


def test_warnings_print_in_one_line(capsys, model_dir, monkeypatch):
    """A warning (no matplotlib, say) is `warning: <message>`, without a source line."""
    import warnings

    import blockrecurrent.text

    def warns(*args, **kwargs):
        warnings.warn("matplotlib is not installed, so no plot", stacklevel=2)

    monkeypatch.setattr(blockrecurrent.text, "generate_text", warns)
    code, _, err = run(capsys, "generate", model_dir)
    assert code == 0 and err == "warning: matplotlib is not installed, so no plot\n"
    assert warnings.showwarning.__name__ != "_warning_in_one_line"  # restored after main()


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

    import blockrecurrent.evaluate

    monkeypatch.setattr(blockrecurrent.evaluate, "evaluate_checkpoint", broken)
    with pytest.raises(TypeError, match="NoneType"):
        main(["eval", str(model_dir)])
    assert "error:" not in capsys.readouterr().err


def tiny_config(tmp_path, corpus_dir) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(f"""[model]
preset = "tiny"
[train]
data = "{corpus_dir}"
cache_dir = "{tmp_path / 'cache'}"
batch_size = 2
max_steps = 2
warmup_steps = 1
eval_interval = 0
eval_tokens = 4096
save_interval = 0
log_interval = 1
""")
    return str(path)


def test_quick_and_full_main_jobs_train_in_their_own_folders(capsys, tmp_path, monkeypatch):
    """`brt run --quick` then `brt run`: the quick job's finished run cannot block the full one."""
    import blockrecurrent.compare

    class Stop(Exception):
        pass

    seen = []

    def stop(model_config, train_config):  # the first check of the run's folder: stop there
        seen.append(train_config.out_dir)
        raise Stop

    monkeypatch.setattr(blockrecurrent.compare, "check_reusable", stop)
    monkeypatch.chdir(tmp_path)
    for argv in (["--quick"], [], ["--quick", "--out", "mine"]):
        with pytest.raises(Stop):
            main(["run", *argv])
    assert seen == [os.path.join("report-quick", "train"), os.path.join("report", "train"),
                    os.path.join("mine", "train")]


def test_main_job_moves_its_own_finished_run_of_other_settings_aside(capsys, tmp_path,
                                                                      monkeypatch):
    """report/train left by a run of other settings (an older --quick job): moved to
    report/train-previous with a note, not refused; a folder given as out_dir= is refused."""
    import blockrecurrent.compare

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # training would start here
        raise Stop

    monkeypatch.setattr(blockrecurrent.compare, "train_or_reuse", stop)
    monkeypatch.chdir(tmp_path)
    other = {"model_config": {"dim": 1}, "train_config": {"max_steps": 10}, "summary": {}}
    (tmp_path / "report" / "train").mkdir(parents=True)
    (tmp_path / "report" / "train" / "summary.json").write_text(json.dumps(other))
    with pytest.raises(Stop):
        main(["run"])
    err = capsys.readouterr().err
    moved = os.path.join("report", "train-previous")
    assert f"held a finished run with other settings; moved it to {moved}" in err
    assert (tmp_path / moved / "summary.json").is_file()
    assert not (tmp_path / "report" / "train").exists()
    code, _, err = run(capsys, "run", f"out_dir={moved}")
    assert code == 2 and "other settings" in err and (tmp_path / moved).is_dir()


def test_run_quick_end_to_end(capsys, tmp_path, corpus_dir):
    """The main job on a tiny model and corpus: train, evaluate, sample, report."""
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "run", "--quick", "--threads", "1", "--out", out,
                            "--config", tiny_config(tmp_path, corpus_dir), "max_steps=2")
    assert code == 0, err
    assert "test bits per byte" in stdout and "--- sample" in stdout
    for name in ("README.md", "results.json", "eval-test.json", "metrics.jsonl", "train/model"):
        assert (out / name).exists(), name
    readme = (out / "README.md").read_text()
    assert "## Loss by position in the document" in readme and "| [0, 1k) |" in readme
    if importlib.util.find_spec("matplotlib"):
        assert "![test loss by position](eval-test.png)" in readme
    res = json.loads((out / "results.json").read_text())
    assert res["train_summary"]["step"] == 2 and res["eval"]["tokens"] > 0
    # The state section: the ablation by position and the recall probe.
    assert "## Does the state help?" in readme and "state reset" in readme
    gain = {g["label"]: g for g in res["state_ablation"]}
    assert gain["all"]["tokens"] == res["eval"]["tokens"]
    assert gain["all"]["carry"] == pytest.approx(res["eval"]["bits_per_token"])
    assert {r["model"] for r in res["probe"]} == {"recurrent", "slide"}
    assert (out / "probe" / "probe.json").is_file()
    # The exported model works with the other commands.
    code, _, err = run(capsys, "generate", out / "train" / "model", "--prompt", "def",
                       "--max-new-tokens", "4", "--threads", "1")
    assert code == 0, err


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
    import blockrecurrent.train as T

    monkeypatch.setattr(T, "lm_loss_sum", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    config = tiny_config(tmp_path, corpus_dir)
    code, _, err = run(capsys, "train", "--threads", "1", "--config", config,
                       f"out_dir={tmp_path / 'nan'}", "max_nonfinite=1")
    assert code == 2 and "\nerror: training diverged: " in err and "Traceback" not in err
    monkeypatch.undo()
    monkeypatch.setattr(T, "train", lambda *a, **k: {"status": "interrupted", "step": 1})
    code, _, err = run(capsys, "train", "--threads", "1", "--config", config,
                       f"out_dir={tmp_path / 'stop'}")
    assert code == 130 and "--resume" in err


def test_probe_command(capsys, tmp_path):
    """brt probe trains both models on a tiny setting, writes the report, and evaluates a saved
    model; bad settings exit 2 before any training."""
    out = tmp_path / "probe"
    code, stdout, err = run(capsys, "probe", "--threads", "1", "--keys", "1", "--distances", "3",
                            "--lead", "1", "--steps", "3", "--save-models", "--out", out,
                            "block_width=8", "num_state_vectors=8", "gate=lstm")
    assert code == 0, err
    assert "recurrent K=1" in stdout and (out / "probe.md").is_file()
    rows = json.loads((out / "probe.json").read_text())
    assert [r["model"] for r in rows] == ["recurrent", "slide"] and rows[0]["steps"] == 3
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
    from blockrecurrent.compare import _scaled_train_config
    from blockrecurrent.settings import load_train_config

    tc = load_train_config(None, "tiny", ["max_steps=50", "lr=0.002"])[1]
    xl = _scaled_train_config(tc, "xl", 4, tmp_path / "xl")
    assert xl.unset == tc.unset == {"warmup_steps", "batch_size", "eval_tokens"}
    assert xl.warmup_steps == 5


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
