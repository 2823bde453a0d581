"""The state each rank of a run carries besides the weights: its RNG streams (torch, CUDA, numpy,
Python) and its lanes' carried memories and states, as plain tensors for a checkpoint and back.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

from ..model.memories import XLMemories


def rng_state(device: torch.device) -> dict:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": random.getstate()}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def carried_tensors(mems: XLMemories | None, states: Tensor | None) -> dict[str, Tensor]:
    """The lanes' carried memories ("memories.*") and states ("states"), on the CPU."""
    tensors = {} if mems is None else {f"memories.{k}": v.detach().contiguous().cpu()
                                       for k, v in mems.state_dict().items()}
    if states is not None:
        tensors["states"] = states.detach().contiguous().cpu()
    return tensors


def carried_from_tensors(tensors: dict, device, depth: int, batch_size: int
                         ) -> tuple[XLMemories | None, Tensor | None]:
    """carried_tensors' inverse, checked against the model's depth and the batch size."""
    mems = {k[len("memories."):]: v.to(device) for k, v in tensors.items()
            if k.startswith("memories.")}
    mems = XLMemories.from_state_dict(mems) if mems else None
    states = tensors["states"].to(device) if "states" in tensors else None
    if mems is not None and (len(mems.keys) != depth or mems.batch_size != batch_size):
        raise ValueError("carried memories do not fit this model and batch_size")
    if states is not None and states.shape[1] != batch_size:
        raise ValueError("carried states do not fit batch_size")
    return mems, states
