"""blockrecurrent: the Block-Recurrent Transformer (Hutchins et al., NeurIPS 2022) in PyTorch."""

from .config import PRESETS, BlockRecurrentConfig, preset
from .model import BlockRecurrentTransformer, XLMemories

__all__ = ["BlockRecurrentConfig", "BlockRecurrentTransformer", "XLMemories", "PRESETS", "preset"]
__version__ = "0.1.0"
