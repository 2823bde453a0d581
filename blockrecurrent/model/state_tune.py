"""State tuning's file: every recurrent layer's learned document-start state (`initial_state`,
and optionally the slots' `state_ids`), trained with every other weight frozen
(train/init_from.py, `brt train --tune-state`), saved apart from the model (a few KB to a few
MB) and applied to the base model it was tuned on (`brt generate --state-tune FILE`).

    apply_state_tune(model, "runs/tuned/state_tune.safetensors")

The file's metadata names the base model by a fingerprint of its config and of every other
weight (names, shapes, dtypes, a sample of values), so a file is refused (ValueError) on another
base model, before anything is changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..files import write_atomic

__all__ = ["STATE_TUNE_FILE", "apply_state_tune", "base_fingerprint", "save_state_tune",
           "tuned_parameters"]

STATE_TUNE_FILE, FORMAT = "state_tune.safetensors", "blockrecurrent-state-tune"
TUNED = ("initial_state", "state_ids")


def _tuned_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in TUNED


def weights_fingerprint(model: nn.Module, skip=lambda name: False) -> str:
    """A hash of the config and of every weight not skipped: its name, shape, dtype and a
    strided sample of up to 256 of its values (cheap at any size, the same on every device)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if skip(name):
                continue
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            h.update(flat[::max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of everything that state tuning leaves unchanged."""
    return weights_fingerprint(model, skip=_tuned_name)


def tuned_parameters(model: nn.Module, with_ids: bool = False) -> dict[str, nn.Parameter]:
    """name -> parameter: each recurrent layer's initial_state (and state_ids with_ids)."""
    keep = TUNED if with_ids else TUNED[:1]
    params = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in keep}
    if not params:
        raise ValueError("the model has no recurrent layer: there is no state to tune")
    return params


def save_state_tune(path: str | os.PathLike, model: nn.Module, with_ids: bool = False,
                    fingerprint: str | None = None, extra: dict | None = None) -> dict:
    """Write the tuned tensors to `path` atomically -> the header. fingerprint: the base
    model's, taken before tuning (base_fingerprint; the same after, as only tuned tensors
    change)."""
    from safetensors.torch import save

    tensors = {n: p.detach().float().contiguous().cpu()
               for n, p in tuned_parameters(model, with_ids).items()}
    header = {"format": FORMAT, "version": 1,
              "base_fingerprint": fingerprint or base_fingerprint(model),
              "tensors": sorted(tensors), **(extra or {})}
    data = save(tensors, metadata={"state_tune": json.dumps(header)})
    write_atomic(Path(path), lambda f: f.write(data))
    return header


def apply_state_tune(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a state-tuning file into `model` (in place) -> its header. ValueError, with the
    model unchanged, if the file is not one, is corrupt or was tuned on another base model."""
    from safetensors import safe_open
    from safetensors.torch import load

    path = Path(path)
    if path.is_dir():
        path = path / STATE_TUNE_FILE
    if not path.is_file():
        raise ValueError(f"state tuning file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["state_tune"])
        tensors = load(path.read_bytes())
    except Exception as err:
        raise ValueError(f"{path} is not a readable state tuning file: "
                         f"{type(err).__name__}: {err}") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a state tuning file")
    if header.get("base_fingerprint") != base_fingerprint(model):
        cast = sorted({str(p.dtype) for p in model.parameters()} - {str(torch.float32)})
        hint = (f" (or the model is in {', '.join(cast)}: apply the file to it in float32, then "
                f"cast it)" if cast else "")
        raise ValueError(f"{path} was tuned on another base model{hint}; apply it to the model "
                         f"it was tuned on")
    params = dict(model.named_parameters())
    bad = [n for n, t in tensors.items() if not _tuned_name(n) or n not in params
           or params[n].shape != t.shape]
    if bad:
        raise ValueError(f"{path} holds tensors that do not fit this model: {bad}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return header
