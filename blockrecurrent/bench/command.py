"""The benchmark's command line: `brt bench` and `python -m blockrecurrent.bench`.

    python -m blockrecurrent.bench                    # "small" preset, lengths 1024 4096 16384
    python -m blockrecurrent.bench --reference        # the reference config (REFERENCE_CONFIG)
    python -m blockrecurrent.bench --lengths 1024 65536 --dtypes fp32 bf16 --json out.json

What is measured, and how: run.py (streams) and decode.py (--decode).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..model.config import PRESETS, BlockRecurrentConfig
from ..model.dtypes import names_of
from ..train.settings import load_train_config
from . import run
from .decode import run_decode
from .report import DTYPES, MODES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options, for `brt bench` and `python -m blockrecurrent.bench`."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", default="small", choices=sorted(PRESETS),
                       help="model preset (default: small)")
    which.add_argument("--config", type=Path,
                       help="a model config.json (as save_pretrained writes) instead of a preset")
    which.add_argument("--reference", action="store_true",
                       help="the reference config: a small fixed model (dim 256, depth 4, "
                            "4 x 64 heads, W = S = 128, segment 1024, recurrent layer 3), batch "
                            "4, one 2048-token stream, fp32 and bf16")
    parser.add_argument("--batch-size", type=int, help="batch rows (default 1)")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="stream lengths in tokens per row (default: 1024 4096 16384)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="train (forward, loss, backward, AdamW step) and/or infer")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=names_of(DTYPES),
                        help="default: float32, plus bfloat16 where the device has fast bf16 "
                             "kernels (with --reference: both)")
    parser.add_argument("--no-baselines", action="store_true", help="only the recurrent model")
    parser.add_argument("--repeats", type=int, default=None,
                        help="passes per length; the median is reported (default 3; 5 with "
                             "--reference)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (with --decode: also time the compiled "
                             "decoding step)")
    parser.add_argument("--decode", action="store_true",
                        help="benchmark cached decoding instead of streams: tokens/s at each "
                             "--decode-batches size for the fast and the legacy (general) step, "
                             "against the memory-read bound measured in the same run")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32],
                        help="with --decode: batch sizes (default 1 8 32)")
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="with --decode: prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="with --decode: steps per timed run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--md", type=Path, help="write the tables as markdown")
    parser.add_argument("model_overrides", nargs="*", metavar="key=value",
                        help="model settings over the preset, values as TOML "
                             "(e.g. depth=12 recurrent_layers=[10])")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run what the parsed options ask for (`brt bench` calls this); returns the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(modes=args.modes, baselines=not args.no_baselines, compile=args.compile,
                  device=args.device, out_json=args.json, out_md=args.md)
    if args.model_overrides and (args.config or args.reference):
        raise ValueError("key=value model settings apply to a --preset; edit the config file "
                         "instead")
    if args.decode:
        return run_decode(args, _config(args))
    if args.reference:
        if args.batch_size is not None or args.lengths is not None:
            raise ValueError("--reference fixes batch 4 and a 2048-token stream; drop "
                             "--batch-size/--lengths or benchmark a --preset/--config instead")
        return run.run_reference(dtypes=args.dtypes or DTYPES, repeats=args.repeats or 5,
                                 **common)
    return run.run_benchmark(_config(args), batch_size=args.batch_size or 1,
                             lengths=args.lengths or (1024, 4096, 16384),
                             dtypes=args.dtypes or "auto", repeats=args.repeats or 3, **common)


def _config(args: argparse.Namespace) -> BlockRecurrentConfig:
    """The model of --reference, --config or --preset with key=value settings."""
    if args.reference:
        return BlockRecurrentConfig(**run.REFERENCE_CONFIG)
    if args.config:
        return BlockRecurrentConfig.from_json(args.config)
    return load_train_config(preset=args.preset,
                             overrides=[f"model.{o}" for o in args.model_overrides])[0]


def cli(argv=None) -> int:
    """`python -m blockrecurrent.bench`: bad settings exit 2 with a message."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m blockrecurrent.bench", description=run.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        main(args)
    except (ValueError, TypeError) as err:  # bad settings: a message, not a traceback
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
