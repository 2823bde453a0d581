"""`python -m blockrecurrent.train` (what torchrun launches): the trainer's command line.

    torchrun --nproc_per_node=4 -m blockrecurrent.train --config configs/paper-150m.toml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import NonFiniteLossError, is_expected
from ..model.config import PRESETS
from .resume import load_resume_config
from .settings import load_train_config, settings_help
from .trainer import train


def main(argv=None) -> int:
    """`python -m blockrecurrent.train [--config FILE] [--preset NAME] [--resume] [key=value ...]`,
    also under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m blockrecurrent.train",
                                     description="Train a Block-Recurrent Transformer "
                                     "(also under torchrun)", epilog=settings_help())
    parser.add_argument("--config", help="TOML or YAML file with [model] and [train] sections")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="model preset (default: the file's, else small)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from out_dir's latest checkpoint, with its saved settings "
                             "under those given")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="train settings, or model.key=value; values are TOML "
                             "(e.g. betas=[0.9,0.99])")
    args = parser.parse_intermixed_args(argv)  # --resume may follow key=value settings
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        if args.resume:  # the run's own settings, from its checkpoint, and those given
            model_config, train_config, note = load_resume_config(args.config, args.preset,
                                                                  args.overrides)
            if note and main_rank:
                print(note, file=sys.stderr)
        else:
            model_config, train_config = load_train_config(args.config, args.preset,
                                                           args.overrides)
        summary = train(model_config, train_config, resume=args.resume)
    except Exception as err:
        if not is_expected(err):  # a bug: its traceback
            raise
        if main_rank:
            print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NonFiniteLossError) else 1
    if main_rank:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
