"""`brt`'s parser: one function per subcommand adds its options (commands.py runs them). What
is imported here imports only the standard library, so that `brt --help` is quick."""

from __future__ import annotations

import argparse

from ..model.dtypes import DTYPE_NAMES  # stdlib only
from ..report import EVAL_TOKENS, QUICK_EVAL_TOKENS  # stdlib only at import
from .commands import (
    cmd_bench,
    cmd_compare,
    cmd_eval,
    cmd_generate,
    cmd_passkey,
    cmd_probe,
    cmd_run,
    cmd_serve,
    cmd_train,
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_Formatter = argparse.HelpFormatter


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The `brt` parser. with_bench=False leaves out bench's own options (they need torch)."""
    parser = argparse.ArgumentParser(
        prog="brt", formatter_class=_Formatter,
        description="The Block-Recurrent Transformer (Hutchins et al. 2022): train, evaluate, "
                    "generate, compare against baselines, benchmark.",
        epilog="Start with `brt run` (the main job) or `brt <command> --help`.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of errors instead of a one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compute = argparse.ArgumentParser(add_help=False)  # options of the commands that compute
    compute.add_argument("--threads", type=_positive_int, default=None,
                         help="CPU threads for torch (default: torch's choice, one per core); "
                              "on a busy machine 1 can be much faster")

    def add(name, func, help, description=None, threads=True):
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=_Formatter, parents=[compute] if threads else [])
        p.set_defaults(func=func)
        return p

    _train_command(add)  # in the order --help lists them
    _eval_command(add)
    _generate_command(add)
    _serve_command(add)
    _compare_command(add)
    _bench_command(add, with_bench)
    _probe_command(add)
    _passkey_command(add)
    _run_command(add)
    return parser


def _state_tune_option(p) -> None:
    p.add_argument("--state-tune", metavar="FILE", default=None,
                   help="apply a state tuning file (brt train --tune-state) to the model first")


def _train_options(p) -> None:
    from ..model.config import PRESETS

    p.add_argument("--config", metavar="FILE",
                   help="config file (TOML or YAML) with [model] and [train] sections, "
                        "e.g. configs/small.toml")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model preset to start from (default: the config file's, else small)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a training field (e.g. max_steps=200) or a model field "
                        "(e.g. model.depth=6)")


def _train_command(add) -> None:
    p = add("train", cmd_train, "train a model",
            "Train a model; the final model is exported to OUT_DIR/model, checkpoints to "
            "OUT_DIR/checkpoints, metrics to OUT_DIR/metrics.jsonl.")
    from ..train.settings import settings_help  # stdlib only

    p.epilog = settings_help()
    _train_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in out_dir, with the settings saved "
                        "there; those given (key=value, --config, --preset) apply over them")
    p.add_argument("--tune-state", metavar="MODEL_DIR", default=None,
                   help="state tuning: init_from=MODEL_DIR tune=state, a run that trains only "
                        "each recurrent layer's document-start state of this saved model; also "
                        "writes OUT_DIR/state_tune.safetensors for --state-tune")
    p.add_argument("--tune-state-ids", action="store_true",
                   help="with --tune-state: tune=state+ids, the slots' ids too (added at every "
                        "block, they act on whole documents; the start state alone only on "
                        "their first blocks: docs/serving.md)")


def _eval_command(add) -> None:
    p = add("eval", cmd_eval, "evaluate a saved model on held-out documents",
            "Bits per byte and bits per token of a saved model on the held-out documents of a "
            "corpus, overall and by position in the document; writes JSON and a PNG plot.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="model directory: config.json, model.safetensors and tokenizer files "
                        "(e.g. runs/small/model)")
    p.add_argument("--data", default=None,
                   help="corpus: 'stdlib', a .jsonl file, a directory or a glob pattern "
                        "(default: the training run's, read from its trainer.json, else stdlib)")
    p.add_argument("--text-field", default=None,
                   help="text field of .jsonl records (default: the training run's, else text)")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="held-out split to evaluate (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents in the val split, as in training "
                        "(default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.05,
                   help="fraction of documents in the test split, as in training "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="documents read side by side (default: %(default)s)")
    p.add_argument("--segment-len", type=_positive_int, default=None,
                   help="tokens per model call (default: the model's max_seq_len)")
    p.add_argument("--max-docs", type=_positive_int, default=None,
                   help="evaluate only the first N documents of the split")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="evaluate only as many whole documents as fit in N tokens")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="autocast dtype (default: the model's own, float32)")
    p.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--cache-dir", default="data_cache",
                   help="directory for the tokenized held-out documents (default: %(default)s)")
    _state_tune_option(p)
    p.add_argument("--reset-state", choices=("carry", "every-segment", "other-document"),
                   default="carry",
                   help="carry the recurrent state across segments (default), reset it to the "
                        "initial state at every segment (the state ablation; the window's "
                        "cache still carries), or give each document, at every segment, the "
                        "state another document reached (what the state knows, without an "
                        "initial state in mid-document)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write eval-<split>.json and .png (default: CHECKPOINT/eval)")


def _generate_command(add) -> None:
    p = add("generate", cmd_generate, "continue a prompt with a saved model",
            "Print the continuation of a prompt as it is generated (speeds go to stderr). "
            "Without a prompt, the model writes a document from its start.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model directory (see brt eval)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompt", help="prompt text, read as the start of a document")
    which.add_argument("--prompt-file", metavar="FILE",
                       help="read the prompt from a UTF-8 text file")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="stop after this many new tokens, or when the model starts a new document "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 picks the most likely token, greedy "
                        "(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens holding this much "
                        "probability, nucleus sampling (default: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    p.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu or cuda (default: %(default)s)")
    _state_tune_option(p)
    p.add_argument("--state-in", metavar="FILE", default=None,
                   help="continue the document saved in this session file (written by "
                        "--state-out of an earlier call with the same model): the prompt follows "
                        "it, no new document is started")
    p.add_argument("--state-out", metavar="FILE", default=None,
                   help="save the document's session (memories, states, next-token logits; its "
                        "size is set by the block width, not the document's length) to this "
                        "file, atomically")


def _serve_command(add) -> None:
    p = add("serve", cmd_serve, "serve a saved model over HTTP (OpenAI completions API)",
            "Serve a saved model with OpenAI's /v1/completions (streaming too) and /v1/models; "
            "a request naming a `session` (extra_body={'session': ID} with the openai client; "
            "'new_session': true creates it) continues that session's document, whose state is "
            "kept in memory and written to SESSION_DIR after every request. Concurrent requests "
            "decode as one batch. Needs the serve extra: pip install 'blockrecurrent[serve]'.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model directory (see brt eval)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on "
                   "(default: %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000,
                   help="port; 0 takes a free one, named in the first line (default: %(default)s)")
    p.add_argument("--session-dir", default="sessions", metavar="DIR",
                   help="where session files are kept (default: %(default)s)")
    p.add_argument("--name", default=None,
                   help="the model id clients pass as `model` (default: the directory's name)")
    p.add_argument("--max-tokens", type=_positive_int, default=1024,
                   help="most new tokens per request (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=65536,
                   help="most prompt tokens per request (default: %(default)s)")
    p.add_argument("--max-sessions-in-memory", type=_positive_int, default=64,
                   help="sessions kept in memory; the others are read from disk when used "
                        "(default: %(default)s)")
    p.add_argument("--max-batch", type=_positive_int, default=64,
                   help="most requests decoded at once (default: %(default)s)")
    p.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu or cuda (default: %(default)s)")
    _state_tune_option(p)


def _compare_command(add) -> None:
    p = add("compare", cmd_compare, "train and compare the recurrent model with Slide and XL",
            "Train the recurrent model, Slide at the same depth (the ablation of the state), "
            "Slide with one more layer and XL from one config at equal training tokens and "
            "optimizer steps, evaluate all on the same held-out documents (longest first), add "
            "the recurrent model's state ablation, and write comparison.md, comparison.json "
            "and comparison.png.")
    _train_options(p)
    p.add_argument("--out", default="runs/compare", metavar="DIR",
                   help="output directory, one sub-directory per model (default: %(default)s)")
    p.add_argument("--no-extra-layer", action="store_true",
                   help="leave out Slide with one more layer (the paper's Slide:13L, matching "
                        "the recurrent cell's parameters) and give XL the same depth")
    p.add_argument("--eval-batch-size", type=_positive_int, default=None,
                   help="documents read side by side in evaluation (default: 8 on a GPU; on a "
                        "CPU the number that leaves the least padding)")
    p.add_argument("--max-eval-tokens", type=_positive_int, default=None,
                   help="evaluate only as many whole held-out documents as fit in N tokens")


def _bench_command(add, with_bench: bool) -> None:
    p = add("bench", cmd_bench, "benchmark throughput and memory against the baselines",
            "Throughput, memory and FLOP utilisation of the model and its Slide and XL "
            "baselines (see blockrecurrent/bench/).", threads=False)  # bench has --threads
    if with_bench:
        try:
            from ..bench import command as bench
        except ImportError as err:  # keep the other commands working
            def unavailable(args, err=err):
                raise ImportError(f"brt bench is unavailable: {err}")
            p.set_defaults(func=unavailable)
        else:
            bench.add_arguments(p)


def _probe_command(add) -> None:
    from ..train.settings import TrainConfig  # stdlib only

    p = add("probe", cmd_probe, "long-range recall probes: the recurrent model against Slide",
            "Train the recurrent model and Slide (no recurrent layer) from scratch on synthetic "
            "recall tasks (keys placed d blocks before the questions, after filler) and print "
            "accuracy by distance and number of keys; writes probe.json, probe.md, probe.png. "
            "key=value settings change the probe model (default: 2 layers, dim 64, W = S = 16).")
    p.add_argument("--task", choices=("recall", "mqar"), default="recall",
                   help="recall: the long-range recall probes; mqar: multi-query associative "
                        "recall (Zoology, Arora et al. 2023) for full attention, Slide and the "
                        "recurrent model, writes mqar.json, mqar.md, mqar.png "
                        "(default: %(default)s)")
    p.add_argument("--grid", nargs="+", default=["256:16"], metavar="N:K",
                   help="mqar: sequence length:pairs settings (default: 256:16)")
    p.add_argument("--kind", choices=("keys", "pairs"), default="keys",
                   help="keys: recall K keys in order; pairs: K key->value pairs, questions "
                        "key -> value (default: %(default)s)")
    p.add_argument("--keys", type=_positive_int, nargs="+", default=[1, 2, 4], metavar="K",
                   help="numbers of keys (or pairs) to store (default: 1 2 4)")
    p.add_argument("--distances", type=_positive_int, nargs="+", default=[1, 2, 3, 4, 5, 6],
                   metavar="D", help="blocks from the keys to the questions (default: 1-6)")
    p.add_argument("--queries", type=_positive_int, default=1,
                   help="pairs: questions at the end (default: %(default)s)")
    p.add_argument("--lead", type=int, default=2,
                   help="filler blocks before the keys (default: %(default)s)")
    p.add_argument("--models", nargs="+", choices=("recurrent", "slide", "full"), default=None,
                   help="models to train (default: recurrent and slide; mqar: and full)")
    p.add_argument("--steps", type=_positive_int, default=300,
                   help="training steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: 2e-3)")
    p.add_argument("--betas", type=float, nargs=2, default=list(TrainConfig.betas),
                   metavar=("B1", "B2"),
                   help="Adam's betas (default: %(default)s, the trainer's)")
    p.add_argument("--mixed", action="store_true",
                   help="train one model per K on all the distances in turn (the same steps) "
                        "and evaluate it at each, instead of one model per distance")
    p.add_argument("--beyond", type=int, nargs="*", default=[4, 16, 64], metavar="F",
                   help="also score every trained model with the keys F times its longest "
                        "trained distance back: how far its memory reaches beyond what training "
                        "showed it (default: 4 16 64; none: --beyond with no value)")
    p.add_argument("--train-leads", type=int, nargs="+", default=[], metavar="L",
                   help="train with L filler blocks before the keys, each in turn (scored at "
                        "--lead): the key's place in the document varies, which lets the memory "
                        "hold further than the trained distance (e.g. 0 8 16 ... 64)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="evaluate this saved model instead of training new ones")
    p.add_argument("--save-models", action="store_true",
                   help="save every trained model under OUT/models/")
    p.add_argument("--out", default="runs/probe", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="probe model settings, e.g. gate=lstm num_state_vectors=32")


def _run_command(add) -> None:
    p = add("run", cmd_run, "the main job: train, evaluate and sample; write a report",
            "Train the small model on the built-in corpus (the CPython standard library), "
            "evaluate it on held-out documents by position, sample a continuation, and write "
            "a report folder (README.md, plots, metrics).")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report directory (default: report; with --quick: report-quick, so that "
                        "the quick and the full job do not share a training run)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of the whole pipeline in a minute or two (a few training "
                        "steps, a small evaluation)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="training config file (default: configs/small.toml if present, else "
                        "the 'small' preset)")
    p.add_argument("--max-eval-tokens", type=_positive_int, default=None,
                   help=f"evaluate only as many whole test documents as fit in N tokens "
                        f"(default {EVAL_TOKENS:,}; --quick: {QUICK_EVAL_TOKENS:,})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a training field or a model field (model.key=value)")


def _passkey_command(add) -> None:
    p = add("passkey", cmd_passkey, "passkey retrieval of a saved model by document length",
            "A 5-digit key stated once in a long document of filler text and asked for at its "
            "end (Mohtashami & Jaggi 2023): exact-match accuracy by length, each document read "
            "in constant memory; writes passkey.json and passkey.md.")
    p.add_argument("checkpoint", metavar="MODEL_DIR",
                   help="model directory with its tokenizer (e.g. runs/small/model)")
    p.add_argument("--lengths", type=_positive_int, nargs="+", default=[1024, 4096, 16384, 65536],
                   metavar="N", help="document lengths in tokens (default: 1024 4096 16384 65536)")
    p.add_argument("--docs", type=_positive_int, default=20,
                   help="documents per length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="keys and depths (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="documents read side by side (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: MODEL_DIR/passkey)")
