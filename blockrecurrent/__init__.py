"""blockrecurrent: the Block-Recurrent Transformer (Hutchins et al., NeurIPS 2022) in PyTorch.

The names below are imported on first use (PEP 562), so that `brt --help` and the stdlib-only
modules (errors, report) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {"BlockRecurrentConfig": "model.config", "PRESETS": "model.config",
            "preset": "model.config",
            "BlockRecurrentTransformer": "model.transformer", "XLMemories": "model.memories"}

__all__ = ["BlockRecurrentConfig", "BlockRecurrentTransformer", "XLMemories", "PRESETS", "preset"]
__version__ = "0.2.0"

if TYPE_CHECKING:
    from .model.config import PRESETS, BlockRecurrentConfig, preset
    from .model.memories import XLMemories
    from .model.transformer import BlockRecurrentTransformer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
