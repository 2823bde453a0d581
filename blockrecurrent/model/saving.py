"""A model on disk: config.json and model.safetensors (weights only: nothing is ever
unpickled), plus the two-line block_recurrent_hf.py through which transformers loads the same
directory (blockrecurrent.hf). Loading checks the device first and the weights against the
config, and names what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..files import usual_mode
from .config import HF_KEYS, HF_SHIM_FILE, BlockRecurrentConfig

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "check_device", "load_model", "save_model"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# What transformers imports from a saved directory under trust_remote_code (see config.HF_KEYS):
# the code stays in the installed package, so a saved directory never holds a stale copy of it.
_HF_SHIM = ('"""Lets transformers load this directory with trust_remote_code=True."""\n'
            "from blockrecurrent.hf import BlockRecurrentForCausalLM, BlockRecurrentHFConfig\n")



def _run_hint(directory: Path) -> str:
    """Where a training run's out_dir keeps its models: model/, else its checkpoints."""
    if (directory / "model" / CONFIG_FILE).is_file():
        return f"; it holds a training run, whose model is {directory / 'model'}"
    steps = sorted((directory / "checkpoints").glob("step_*/" + CONFIG_FILE))
    if steps:  # zero-padded step numbers: the last in name order is the newest
        return (f"; it holds an unfinished training run, whose latest checkpoint "
                f"{steps[-1].parent} is a saved model too")
    return ""


def check_device(device) -> torch.device:
    """A torch device that exists on this machine, else a ValueError saying which ones do."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} ({err}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here; use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use cpu")
    return dev



def save_model(model: nn.Module, directory: str | os.PathLike) -> None:
    """model.save_pretrained(directory)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("to_logits.weight")  # shared with token_emb.weight
    # Temporary names and rename: an interrupted save never leaves a half-written file.
    tmp_w, tmp_c = directory / (WEIGHTS_FILE + ".tmp"), directory / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    usual_mode(tmp_w)
    tmp_c.write_text(json.dumps({**HF_KEYS, **model.config.to_dict()}, indent=2))
    (directory / HF_SHIM_FILE).write_text(_HF_SHIM)
    os.replace(tmp_w, directory / WEIGHTS_FILE)
    os.replace(tmp_c, directory / CONFIG_FILE)


def load_model(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """cls.from_pretrained(directory, map_location): cls(config) with the saved weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is not a saved model: {name} is missing"
                             + _run_hint(directory))
    check_device(map_location)  # before reading: else the weights file gets the blame
    try:
        text = (directory / CONFIG_FILE).read_text()
        config = BlockRecurrentConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {err}") from None
    model = cls(config)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from None
    if config.tie_embeddings:
        tensors["to_logits.weight"] = tensors.get("token_emb.weight")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k] is not None
             and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"weights in {directory} do not match its config: missing {missing}, "
                         f"unexpected {unexpected}, wrong shape {wrong}")
    model.load_state_dict(tensors)
    return model.to(map_location)
