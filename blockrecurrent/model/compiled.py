"""The decoding step as one torch.compile graph (`BlockRecurrentTransformer.compile_decode`).

Axis letters: b batch, e model width, h heads, d head width, l cached tokens.

The eager step (`BlockRecurrentTransformer.step`) grows each layer's cache by one token and
reads the window's keys, so its shapes change every step. Here every layer's cache is a
(b, 2W, h, d) buffer written at the step's position and attention reads all 2W positions under
a validity mask built from the position, so that one graph (per batch size and dtype) serves
every step. The graph runs the same layers' `step` methods as the eager step; only the window
(how a key is stored and read) differs. Python around the graph keeps `attention.append`'s
rules, so memories handed out earlier keep their values. Opt-in: the first step of each batch
size compiles for tens of seconds, and masking reads 2W keys where the eager step reads W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import GrowthBuffer, LayerCache, attend
from .memories import XLMemories


def static_buffer(cache: Tensor, buffer: GrowthBuffer | None, dtype: torch.dtype,
                  capacity: int) -> GrowthBuffer:
    """A buffer (b, capacity, h, d) whose first L positions hold `cache` (b, L, h, d) and whose
    position L may be written: `buffer` when `cache` is the longest view yet taken of it and it
    has been zero-filled beyond its views (masked positions must hold finite numbers: attention
    multiplies them by 0), else a fresh zero-filled copy (the first step after a prefill or a
    branch)."""
    L = cache.shape[1]
    if (buffer is None or not buffer.extends(cache, dtype) or buffer.capacity != capacity
            or not buffer.finite):
        buffer = GrowthBuffer(cache.new_zeros(cache.shape[0], capacity, *cache.shape[2:],
                                              dtype=dtype), finite=True)
        buffer.data[:, :L] = cache
    return buffer


class CompiledStep:
    """Calls like the eager step (`BlockRecurrentTransformer._step`), compiled."""

    def __init__(self, model, **compile_kwargs):
        self.model = model
        self.fn = torch.compile(self._layers, fullgraph=True, dynamic=False, **compile_kwargs)
        self._positions: dict = {}

    def _layers(self, tok: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, kbufs: list[Tensor],
                vbufs: list[Tensor], state_kv: list) -> Tensor:
        """Every layer's `step` over the (b, 2W, h, d) buffers; returns x (b, e)."""
        model = self.model
        W = model.config.block_width
        j = torch.arange(2 * W, device=tok.device)
        valid = (j <= pos) & (j > pos - W) if model.config.window == "sliding" else j <= pos
        mask, at = valid.view(1, 1, 1, 2 * W), pos.view(1)
        x = F.embedding(tok, model.token_emb.weight)  # (b, e)

        def window(kb: Tensor, vb: Tensor):
            def attend_window(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
                kb.index_copy_(1, at, k[:, None])
                vb.index_copy_(1, at, v[:, None])
                out = attend(q[:, :, None], kb.transpose(1, 2), vb.transpose(1, 2), mask, scale,
                             True)
                return out.reshape(q.shape[0], -1)
            return attend_window

        r = 0
        for i, layer in enumerate(model.layers):
            x = layer.step(x, cos, sin, window(kbufs[i], vbufs[i]),
                           state_kv[r] if layer.recurrent else None)
            r += layer.recurrent
        return x

    def __call__(self, seq: Tensor, mems: XLMemories, states: Tensor, same_states: bool):
        model = self.model
        L, W = mems.cache_len, model.config.block_width
        dtype = model.token_emb.weight.dtype
        cos, sin = model.layers[0].attn.rotary.row(L, dtype)
        pos = self._positions.get(L)
        if pos is None or pos.device != seq.device:
            pos = self._positions[L] = torch.tensor(L, device=seq.device)
        caches = [mems.layer(i) for i in range(len(model.layers))]
        kbufs = [static_buffer(c.keys, c.key_buffer, dtype, 2 * W) for c in caches]
        vbufs = [static_buffer(c.values, c.value_buffer, dtype, 2 * W) for c in caches]
        state_kv = model.state_kv(mems, states, same_states)
        x = self.fn(seq[:, 0], pos, cos, sin, [b.data for b in kbufs], [b.data for b in vbufs],
                    state_kv)
        nxt = [LayerCache(kb.hand_out(L + 1), vb.hand_out(L + 1), None, kb, vb)
               for kb, vb in zip(kbufs, vbufs, strict=True)]
        return model._output(x[:, None], nxt, state_kv, mems.lengths + 1, states, all_valid=True)
