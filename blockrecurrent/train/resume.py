"""Resuming a run: which checkpoint (latest_checkpoint), whether this run's settings and state
fit it (check_resume, check_model_config, check_state_fits), and the settings to resume with when
none are given but the run's own (load_resume_config, `brt train --resume`). The checkpoint
files themselves are checkpoint.py's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path

from ..data.tokenizer import load_tokenizer
from ..model.config import PRESETS, BlockRecurrentConfig, as_saved_now
from .settings import TrainConfig, _given_settings, _model_config, load_train_config

CHECKPOINT_FORMAT = 1
# Settings that fix the data stream or the vocabulary: a resumed run must keep them.
_RESUME_FIXED = ("data", "text_field", "tokenizer", "bpe_vocab_size", "batch_size", "seed",
                 "baseline", "tune")


# --- finding checkpoints -----------------------------------------------------------------


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (temporary directories start with a dot), oldest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint named by out_dir/checkpoints/latest, else the highest-numbered one."""
    root = Path(out_dir) / "checkpoints"
    steps = step_dirs(root)
    if (root / "latest").is_file():
        name = (root / "latest").read_text("utf-8").strip()
        if not (root / name).is_dir():
            raise ValueError(f"{root / 'latest'} names {name!r}, which does not exist; edit it to "
                             f"name one of {[p.name for p in steps]}")
        return root / name
    return steps[-1] if steps else None


def previous_intact_hint(checkpoint: Path) -> str:
    """How to resume from the newest earlier checkpoint that looks whole, after `checkpoint`
    turned out unreadable; "" when there is none."""
    checkpoint = Path(checkpoint)
    if not re.fullmatch(r"step_\d+", checkpoint.name):
        return ""
    root, step = checkpoint.parent, int(checkpoint.name[5:])
    for prev in reversed(step_dirs(root)):
        if int(prev.name[5:]) < step and _looks_whole(prev):
            return (f". The previous checkpoint {prev} looks intact: to resume from it, move "
                    f"{checkpoint} out of {root} and delete {root / 'latest'}")
    return ""


def _looks_whole(checkpoint: Path) -> bool:
    """Its trainer.json reads and its weights, optimizer and rank 0's files are there."""
    try:
        meta = json.loads((checkpoint / "trainer.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    weights = ("dcp",) if (checkpoint / "dcp").is_dir() else ("model.safetensors", "optimizer.pt")
    return isinstance(meta, dict) and isinstance(meta.get("step"), int) and all(
        (checkpoint / name).exists()
        for name in (*weights, "lanes_rank0.json", "lanes_rank0.safetensors", "rng_rank0.pt"))


def checkpoint_tokenizer(checkpoint):
    """The tokenizer saved in a checkpoint; a ValueError saying where to resume from if it is
    unreadable."""
    try:
        return load_tokenizer(checkpoint)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the tokenizer of {checkpoint}: {err}"
                         + previous_intact_hint(checkpoint)) from None


# --- what must fit -----------------------------------------------------------------------


def check_model_config(saved, now: BlockRecurrentConfig) -> None:
    now, saved = now.to_dict(), as_saved_now(saved)  # a checkpoint from before a field: its value
    if saved != now:
        saved = saved if isinstance(saved, dict) else {}
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)}
        raise ValueError("the model settings differ from the checkpoint's "
                         f"({{name: (checkpoint, now)}}: {diff}); resume with the "
                         "checkpoint's settings or start a new out_dir")


def check_state_fits(state: dict, world_size: int, model_config: BlockRecurrentConfig) -> None:
    """A trainer state (Trainer.state_dict) of this format, world size and model."""
    meta = {k: state.get(k) for k in ("format", "world_size", "model_config")}
    if meta["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"trainer state has format {meta['format']!r}, "
                         f"expected {CHECKPOINT_FORMAT}")
    if meta["world_size"] != world_size:
        raise ValueError(f"the checkpoint was written by {meta['world_size']} processes and "
                         f"this run has {world_size}; resume with the same number "
                         "(its lanes are per rank)")
    check_model_config(meta["model_config"], model_config)


def check_resume(meta: dict, cfg: TrainConfig, path: Path) -> None:
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("train_config"), dict):
        raise ValueError(f"{path / 'trainer.json'} lacks step/train_config; the checkpoint is "
                         "corrupted" + previous_intact_hint(path))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path / 'trainer.json'} has format {meta.get('format')!r}, expected "
                         f"{CHECKPOINT_FORMAT}; it was not written by this trainer")
    saved, now = meta.get("train_config") or {}, cfg.to_dict()
    written = saved.get("parallel", "ddp")
    if written != cfg.parallel:
        raise ValueError(f"the checkpoint {path} was written with parallel={written!r} (its format "
                         f"follows); resume with parallel={written!r}")
    fixed = _RESUME_FIXED
    if written == "fsdp":  # resharded on resume: the global batch (lanes) is what must stay
        fixed = tuple(k for k in fixed if k != "batch_size")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        old = (meta.get("world_size"), saved.get("batch_size"))
        if not all(isinstance(v, int) for v in old) or old[0] * old[1] != world * cfg.batch_size:
            raise ValueError(f"the checkpoint {path} has {old[0]} processes x batch_size {old[1]} "
                             f"lanes and this run {world} x {cfg.batch_size}; keep processes x "
                             "batch_size to resume")
    diff = {k: (saved.get(k), now[k]) for k in fixed if saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"these settings fix the data stream and differ from the checkpoint "
                         f"{path} ({{name: (checkpoint, now)}}: {diff}); resume with the "
                         "checkpoint's "
                         "values or start a new out_dir")
    if meta["step"] > cfg.max_steps:
        raise ValueError(f"the checkpoint {path} is at step {meta['step']}, beyond max_steps="
                         f"{cfg.max_steps}; raise max_steps to continue")


# --- resuming with the run's own settings ------------------------------------------------


def load_resume_config(path=None, preset: str | None = None, overrides=()
                       ) -> tuple[BlockRecurrentConfig, TrainConfig, str | None]:
    """The settings to resume the run in out_dir with: those saved in its latest checkpoint
    (trainer.json), under the file's, the preset's and the overrides given (the resume then
    checks that they fit), and a line saying so. Where out_dir holds no readable checkpoint:
    load_train_config's settings and None (train() then says what is wrong)."""
    name, model_values, train_values = _given_settings(path, preset, overrides)
    out_dir = train_values.get("out_dir", TrainConfig.out_dir)
    checkpoint = None
    if isinstance(out_dir, (str, os.PathLike)):  # else TrainConfig's type check says what's wrong
        out_dir = os.fspath(out_dir)
        checkpoint = latest_checkpoint(out_dir)
    saved = _saved_settings(checkpoint) if checkpoint is not None else None
    if saved is None:
        return (*load_train_config(path, preset, overrides), None)
    saved_model, saved_train = saved
    saved_train = {**saved_train, "out_dir": out_dir}  # where it is now, if it was moved
    model_dict = {**saved_model, **(PRESETS[name] if name else {}), **model_values}
    train_config = TrainConfig(**{**saved_train, **train_values})
    now = train_config.to_dict()
    changed = [f"{k}={now[k]!r}" for k in now if k in saved_train and saved_train[k] != now[k]]
    note = (f"resuming {out_dir} from {checkpoint.name} with the settings saved there"
            + (f", except {', '.join(changed)}" if changed else ""))
    return _model_config(model_dict), train_config, note


def _saved_settings(checkpoint) -> tuple[dict, dict] | None:
    """(model settings, train settings) of a checkpoint's trainer.json; None if unreadable."""
    try:
        meta = json.loads((Path(checkpoint) / "trainer.json").read_text("utf-8"))
        model = BlockRecurrentConfig.from_dict(meta["model_config"]).to_dict()
        train = {f.name: meta["train_config"][f.name] for f in fields(TrainConfig)
                 if f.name in meta["train_config"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model, train
