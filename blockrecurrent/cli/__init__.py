"""The `brt` command line: each subcommand is a thin wrapper over a plain function (commands.py),
its options defined in parser.py; main() here runs one and turns errors into exit statuses.

    brt train    [--config FILE] [--preset NAME] [--resume] [key=value ...]  -> train.train
    brt eval     CHECKPOINT [--data SRC] [--split val|test] ...     -> evaluate.evaluate_checkpoint
    brt generate CHECKPOINT [--prompt TEXT | --prompt-file FILE] ...  -> text.generate_text
    brt serve    CHECKPOINT [--host H] [--port P] [--session-dir DIR] ...   -> serve.server.serve
    brt compare  [--config FILE] [--preset NAME] [--out DIR] [key=value ...]  -> compare.compare
    brt bench    ...                                                          -> bench.main
    brt probe    [--kind keys|pairs] [--keys K ...] [--distances D ...] [key=value ...] -> probes
    brt run      [--out DIR] [--quick] [key=value ...]                     -> report.main_job

Mistakes a user can make (a missing directory, an unknown option, a setting out of range) print
`error: <message>` and exit with status 2, as does a run that diverges (non-finite loss); an
interrupted run (checkpointed, resumable) exits with 130; `brt --traceback ...` shows the full
traceback instead. What is expected is decided by errors.is_expected: anything else is a bug and
keeps its traceback. Heavy modules (torch, the trainer) are imported inside the subcommands, so
`brt --help` is quick. Warnings print as `warning: <message>` (with --traceback, as Python
prints them).
"""

from __future__ import annotations

import sys
import warnings

from ..errors import NonFiniteLossError, TrainingInterrupted, is_expected  # stdlib only
from .parser import build_parser


def _warning_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as `warning: <message>`: its source line means nothing to a user of brt."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `brt` console script -> exit status (0 ok, 2 user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_bench="bench" in argv)  # bench imports torch: only when asked
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse leaves key=value settings that follow an option (`x=1 --resume y=2`)
            settings = all("=" in e and not e.startswith("-") for e in extra)
            if hasattr(args, "overrides") and settings:
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit:  # --help (0) or a bad option (2, after argparse's message)
        return exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 2
    try:
        if getattr(args, "threads", None) and args.command != "bench":
            import torch

            torch.set_num_threads(args.threads)
        with warnings.catch_warnings():  # restores showwarning for callers of main()
            if not args.traceback:
                warnings.showwarning = _warning_in_one_line
            return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.traceback or not is_expected(err):  # a bug, or asked for: the traceback
            raise
        if isinstance(err, TrainingInterrupted):
            print(f"interrupted: {err}", file=sys.stderr)
            return 130
        diverged = "training diverged: " if isinstance(err, NonFiniteLossError) else ""
        print(f"error: {diverged}{err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
