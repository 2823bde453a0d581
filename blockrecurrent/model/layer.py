"""One layer of the model: pre-norm attention and MLP, the attention being the recurrent cell
(cell.py) in recurrent layers and sliding-window attention (attention.py) in the others.

Axis letters: b batch, n tokens of a call, e model width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .attention import LayerCache, WindowAttention, WindowPlan
from .cell import MLP, RecurrentCell, StateKV
from .config import BlockRecurrentConfig

__all__ = ["Layer", "LayerOutput"]


class LayerOutput(NamedTuple):
    """What `Layer.forward` returns: the residual stream, the layer's next cache and, in a
    recurrent layer, its state and state keys/values (see `cell.CellOutput`; else None)."""
    x: Tensor
    cache: LayerCache
    state: Tensor | None
    state_kv: StateKV | None


def _identity(t: Tensor) -> Tensor:
    return t



class Layer(nn.Module):
    """Pre-norm transformer layer; the attention is the recurrent cell in recurrent layers."""

    def __init__(self, config: BlockRecurrentConfig, recurrent: bool):
        super().__init__()
        self.recurrent = recurrent
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = RecurrentCell(config) if recurrent else WindowAttention(config)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: LayerCache, plan: WindowPlan, state: Tensor | None = None,
                state_kv: StateKV | None = None) -> LayerOutput:
        if self.recurrent:
            y, cache, state, state_kv = self.attn(self.attn_norm(x), cache, plan, state, state_kv)
        else:
            y, cache = self.attn(self.attn_norm(x), cache, plan)
        drop = self.drop if self.training else _identity  # no module call per decoding step
        x = x + drop(y)
        x = x + drop(self.mlp(self.mlp_norm(x)))
        return LayerOutput(x, cache, state, state_kv)

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, window,
             state_kv: StateKV | None = None) -> Tensor:
        """`forward` for one token that completes no block, without dropout: x (b, e) -> (b, e).
        (cos, sin) rotate the token's position; window(q, k, v, scale) writes its key and value
        to this layer's cache and attends (attention.CacheStep, or the compiled step's);
        state_kv is the (K_s, V_s) of the state, in a recurrent layer."""
        e, n1, n2 = x.shape[-1:], self.attn_norm, self.mlp_norm
        xn = torch.layer_norm(x, e, n1.weight, n1.bias, n1.eps)  # no module call per token
        if self.recurrent:
            x = self.attn.step(x, xn, cos, sin, window, state_kv)
        else:
            x = self.attn.step(x, xn, cos, sin, window)
        return self.mlp.step(x, torch.layer_norm(x, e, n2.weight, n2.bias, n2.eps))
