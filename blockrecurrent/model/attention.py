"""Sliding-window causal attention over [previous block; block], with rotary positions.

Axis letters: b batch, n new tokens of a call, f frame positions, k blocks, m queries per block,
j keys per block, h heads, d head width, e model width, s state slots.

Every call works on a *frame* (plan.py: `WindowPlan` computes every frame position): one empty
block, then the layer's cache (the previous complete block and the current partial block, L < 2W
tokens, starting on a block boundary), then the n new tokens.
Blocks are aligned to positions in the document, so feeding a stream in any chunk sizes gives the
same blocks and the same windows. A query at frame position f attends to keys f-W < f' <= f
(window "sliding"), or to all keys from the start of the previous block up to f (window "block"),
that belong to its document; either window lies inside its own block and the one before, so full
blocks are processed together as a batch of (W queries x 2W keys) attentions, the banded
computation of the official code, at a cost linear in length.

Cached keys are kept rotated (rotary positions) at their position in the cache, so a call rotates
only its new queries and keys, at positions L .. L+n-1: a decoding step never re-rotates its
window. When the cache drops a block, the keys it keeps are turned back by W positions, once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BlockRecurrentConfig
from .plan import Part, WindowPlan

__all__ = ["CacheStep", "GrowthBuffer", "LayerCache", "Part", "Rotary", "WindowAttention",
           "WindowPlan", "append", "attend", "frame_attention", "unit", "window_attention"]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, flash: bool,
           dropout: float = 0.0) -> Tensor:
    """Softmax attention. q (..., h, m, d), k/v (..., h, j, d), mask broadcastable to
    (..., h, m, j) with True = may attend. The plain path is the reference for the fused one."""
    if flash:
        if q.dim() == 4:  # already what the fused kernels want
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  scale=scale)
        lead = q.shape[:-3]
        flat = lambda t: t.reshape(-1, *t.shape[-3:])  # fused kernels want 4-D inputs
        if mask is not None:
            mask = flat(mask.expand(*lead, *mask.shape[-3:]))
        out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask,
                                             dropout_p=dropout, scale=scale)
        return out.view(*lead, *out.shape[-3:])
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, dropout)
    return probs @ v


def unit(x: Tensor) -> Tensor:
    """x scaled to unit L2 norm over its last axis (F.normalize's arithmetic, one op fewer)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cat(tensors, dim: int) -> Tensor:
    """torch.cat without the copy when there is one tensor (the common case when decoding)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def stack(tensors, dim: int) -> Tensor:
    """torch.stack, a view when there is one tensor."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) at positions counted from the start of the cache.
    Only differences between query and key positions matter, so each key is rotated once, however
    many windows read it. The tables are computed in float64 and grown on demand, so the angles
    stay exact whatever the length of a call."""

    def __init__(self, dim_head: int, block_width: int, base: float):
        super().__init__()
        self.dim_head, self.base = dim_head, base
        self.register_buffer("cos", torch.empty(0, dim_head), persistent=False)
        self.register_buffer("sin", torch.empty(0, dim_head), persistent=False)
        self._grow(4 * block_width)

    @torch.inference_mode(False)  # tables grown while generating must also serve training
    def _grow(self, n: int) -> None:
        d = self.dim_head
        inv_freq = 1.0 / self.base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)  # (n, d/2)
        angles = torch.cat([angles, angles], dim=-1)  # (n, d)
        self.cos = angles.cos().to(self.cos.device, torch.float32)
        # The sign of rotate_half folded in: x rotated = x * cos + roll(x, d/2) * sin.
        sin = angles.sin()
        sin[:, :d // 2] *= -1
        self.sin = sin.to(self.sin.device, torch.float32)

    def _fit(self, n: int) -> None:
        if n > self.cos.shape[0]:
            self._grow(max(n, 2 * self.cos.shape[0]))

    def forward(self, x: Tensor, start: int, inverse: bool = False) -> Tensor:
        """x (..., m, h, d) at positions start .. start+m-1; inverse=True undoes that rotation."""
        m = x.shape[-3]
        self._fit(start + m)
        sin = self.sin[start:start + m, None]
        return self.rotate(x, self.cos[start:start + m, None], -sin if inverse else sin)

    def shift(self, x: Tensor, back: int) -> Tensor:
        """Every vector of x (..., h, d) turned back by `back` positions (one angle for all)."""
        self._fit(back + 1)
        return self.rotate(x, self.cos[back], -self.sin[back])

    def at(self, x: Tensor, pos: Tensor) -> Tensor:
        """x (..., h, d) at positions pos, which broadcasts against x.shape[:-2]."""
        self._fit(int(pos.max()) + 1)
        return self.rotate(x, self.cos[pos][..., None, :], self.sin[pos][..., None, :])

    def row(self, pos: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (d,), of position pos in dtype: what a decoding step rotates by."""
        self._fit(pos + 1)
        cos, sin = self.cos[pos], self.sin[pos]
        return (cos, sin) if cos.dtype == dtype else (cos.to(dtype), sin.to(dtype))

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): three kernels instead of five
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class GrowthBuffer:
    """Storage (b, capacity, h, d) that one layer's keys or values grow into in place, a token
    per decoding step. `last` is the longest view handed out (positions 0 .. fill-1): only a
    cache that *is* that view may be extended in place, since no other view can see the write.
    `finite`: the positions beyond the views were zero-filled (the compiled step reads all of
    them under a mask, and a mask times NaN is still NaN)."""

    __slots__ = ("data", "last", "finite")

    def __init__(self, data: Tensor, finite: bool = False):
        self.data, self.last, self.finite = data, None, finite

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    def extends(self, cache: Tensor, dtype: torch.dtype) -> bool:
        """Whether `cache` may grow into this buffer in place: it is the last view handed out,
        and one more position of the same dtype fits."""
        return cache is self.last and self.data.dtype == dtype and cache.shape[1] < self.capacity

    def hand_out(self, fill: int) -> Tensor:
        """The view of positions 0 .. fill-1, now the one that may be extended."""
        self.last = self.data[:, :fill]
        return self.last


class LayerCache(NamedTuple):
    """One layer's memory from one call to the next (`XLMemories.layer`).
    keys/values (b, l, h, d), l < 2W: the previous complete block and the current partial one,
    keys rotated; compressed: (keys, values) each (b, W, h, d), the c compressed blocks before
    the cache, when use_compressed_mem; key_buffer/value_buffer: what keys/values grow into in
    place when decoding (None: a fresh buffer on the next step)."""
    keys: Tensor | None = None
    values: Tensor | None = None
    compressed: tuple[Tensor, Tensor] | None = None
    key_buffer: GrowthBuffer | None = None
    value_buffer: GrowthBuffer | None = None


class CompressedMemory(nn.Module):
    """Older blocks compressed c:1 by a strided convolution (Compressive Transformer, Rae et al.
    2019): each block of W keys/values becomes W/c slots, and each query block also reads the c
    compressed blocks just before its window, extending its reach by c*W tokens at the cost of W
    extra keys. Compressed keys carry no rotation (window position 0, the oldest).

    Compressed blocks are indexed so that frame block i is at index i + c: one never-valid block,
    the c cached blocks (frame blocks 1-c .. 0), then blocks 1 ..."""

    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        c, inner = config.compressed_mem_factor, config.inner_dim
        self.c, self.heads = c, config.heads
        self.conv_k = nn.Conv1d(inner, inner, c, stride=c)
        self.conv_v = nn.Conv1d(inner, inner, c, stride=c)

    def _compress(self, conv: nn.Conv1d, frame: Tensor) -> Tensor:
        b, f, h, d = frame.shape
        x = frame.reshape(b, f, h * d).transpose(1, 2)  # (b, h*d, f)
        return conv(x.to(conv.weight.dtype)).transpose(1, 2).reshape(b, f // self.c, h, d)

    def extend(self, k_frame: Tensor, v_frame: Tensor, cached: tuple[Tensor, Tensor] | None,
               plan: WindowPlan, rotary: Rotary
               ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """All compressed blocks of the frame (indexed as in the class docstring). The frame's
        keys are rotated; the compressor reads them as they were before rotation.
        Returns ((k, v) each (b, blocks, W/c, h, d), the cache for the next call)."""
        W, c = plan.W, self.c
        b, f, h, d = k_frame.shape
        out = []
        body = slice(plan.index(plan.block_start(1)), None)  # the frame after the empty block 0
        raw_keys = rotary(k_frame[:, body], 0, inverse=True)
        for conv, frame, i in ((self.conv_k, raw_keys, 0), (self.conv_v, v_frame[:, body], 1)):
            fresh = self._compress(conv, frame).view(b, -1, W // c, h, d).to(frame.dtype)
            old = (cached[i].to(frame.dtype).view(b, c, W // c, h, d) if cached is not None
                   else frame.new_zeros(b, c, W // c, h, d))
            out.append(torch.cat([frame.new_zeros(b, 1, W // c, h, d), old, fresh], dim=1))
        # The next call's cache: the c blocks before its first cached block.
        first = plan.first_cached_block + c  # index of that block in `out`
        nxt = tuple(t[:, first - c:first].reshape(b, W, h, d) for t in out)
        return (out[0], out[1]), nxt

    @staticmethod
    def gather(comp: Tensor, part: Part, c: int) -> Tensor:
        """(b, count, W, h, d): for each block of the part, the c compressed blocks it reads."""
        start = part.k_first  # frame block k reads compressed indices k-1 .. k+c-2 (+c offset)
        windows = [comp[:, start - 1 + i:start - 1 + i + part.count] for i in range(c)]
        return torch.cat(windows, dim=2)


def _pairs(frame: Tensor, start: int, count: int, W: int) -> Tensor:
    """(b, count, 2W, ...): for each of `count` blocks from index `start` of frame on, the keys
    of the block before it and its own, side by side."""
    blocks = frame[:, start:start + (count + 1) * W].view(frame.shape[0], count + 1, W,
                                                           *frame.shape[2:])
    return torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=2)


def _with_compressed(kp: Tensor, vp: Tensor, mask: Tensor, part: Part, plan: WindowPlan,
                     compressed: tuple[Tensor, Tensor], rotary: Rotary, c: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The part's keys, values and mask with its compressed keys/values in front. Compressed
    keys all sit at the start of each block's window (its oldest position)."""
    m = part.q_len
    starts = plan.window_rotary_starts(part, kp.device)
    ck = rotary.at(CompressedMemory.gather(compressed[0], part, c),
                   starts[:, None].expand(part.count, plan.W))
    cv = CompressedMemory.gather(compressed[1], part, c)
    kp, vp = torch.cat([ck, kp], dim=2), torch.cat([cv, vp], dim=2)
    lead = torch.broadcast_shapes(mask.shape[:2], part.compressed_mask.shape[:2])
    mask = torch.cat([part.compressed_mask.expand(*lead, 1, m, plan.W),
                      mask.expand(*lead, *mask.shape[2:])], dim=-1)
    return kp, vp, mask


def window_attention(q: Tensor, k_frame: Tensor, v_frame: Tensor, plan: WindowPlan,
                     rotary: Rotary, *, scale: float, flash: bool, dropout: float = 0.0,
                     compressed: tuple[Tensor, Tensor] | None = None, c: int = 1) -> Tensor:
    """Sliding-window attention of the new queries q (b, n, h, d) over the frame's keys and
    values (b, f, h, d), plus compressed memory if given. Queries and keys come rotated (frame
    position f at f - W); `rotary` places the compressed keys. Returns (b, n, h, d)."""
    W, b = plan.W, q.shape[0]
    outs, done = [], 0
    for part in plan.parts:
        m, kc = part.q_len, part.count
        qp = q[:, done:done + part.num_queries].view(b, kc, m, *q.shape[2:])  # (b, k, m, h, d)
        done += part.num_queries
        k0 = plan.index(plan.window_start(part.k_first))  # keys from the start of the block before
        if kc == 1:
            keys = slice(k0, k0 + W + part.q_off + m)
            kp, vp = k_frame[:, keys].unsqueeze(1), v_frame[:, keys].unsqueeze(1)  # (b, 1, j, h, d)
        else:  # full blocks: keys of block k-1 and block k side by side, (b, k, 2W, h, d)
            kp, vp = _pairs(k_frame, k0, kc, W), _pairs(v_frame, k0, kc, W)
        mask = part.window_mask
        if compressed is not None:
            kp, vp, mask = _with_compressed(kp, vp, mask, part, plan, compressed, rotary, c)
        out = attend(qp.transpose(2, 3), kp.transpose(2, 3), vp.transpose(2, 3), mask, scale,
                     flash, dropout)  # (b, k, h, m, d)
        outs.append(out.transpose(2, 3).reshape(b, part.num_queries, *q.shape[2:]))
    return cat(outs, dim=1)


def append(cache: Tensor | None, buffer: GrowthBuffer | None, new: Tensor, capacity: int
           ) -> tuple[Tensor, GrowthBuffer | None]:
    """cache (b, L, h, d) followed by new (b, 1, h, d), as a view of a buffer of `capacity`
    positions, and that buffer. Without autograd the token is written in place when `cache` is
    the longest view yet taken of `buffer` (`GrowthBuffer.extends`), so that no existing view can
    see the write; otherwise (memories passed to a second call, copied, or from a full forward)
    it is copied into a new buffer. Either way every memory handed out earlier keeps its values.
    A decoding step thus copies one token, not its whole cache."""
    L = 0 if cache is None else cache.shape[1]
    if torch.is_grad_enabled():
        return (new if cache is None else torch.cat([cache.to(new.dtype), new], dim=1)), None
    if buffer is None or not buffer.extends(cache, new.dtype):
        buffer = GrowthBuffer(new.new_empty(new.shape[0], max(capacity, L + 1), *new.shape[2:]))
        if L:
            buffer.data[:, :L] = cache
    buffer.data[:, L:L + 1] = new
    return buffer.hand_out(L + 1), buffer


class CacheStep:
    """One layer's cache during an eager decoding step: `__call__` appends the token's key and
    value to the cache (`append`: in place when it may) and attends the window; afterwards
    `keys`, `values` and the buffers are the layer's next cache. The compiled step
    (model.compiled) supplies its own window over fixed-size buffers to the same layer code."""

    __slots__ = ("keys", "values", "key_buffer", "value_buffer", "first", "capacity", "flash")

    def __init__(self, keys: Tensor, values: Tensor, key_buffer: GrowthBuffer | None,
                 value_buffer: GrowthBuffer | None, first: int, capacity: int, flash: bool):
        self.keys, self.values, self.key_buffer, self.value_buffer = (keys, values, key_buffer,
                                                                      value_buffer)
        self.first, self.capacity, self.flash = first, capacity, flash

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q, k, v (b, h, d), q and k rotated -> the attention output (b, h*d) over the cache's
        keys from `first` on and the token's own."""
        self.keys, self.key_buffer = append(self.keys, self.key_buffer, k[:, None], self.capacity)
        self.values, self.value_buffer = append(self.values, self.value_buffer, v[:, None],
                                                self.capacity)  # (b, l+1, h, d) each
        f = self.first
        out = attend(q[:, :, None], self.keys[:, f:].transpose(1, 2),
                     self.values[:, f:].transpose(1, 2), None, scale, self.flash)
        return out.view(q.shape[0], -1)

    def next_cache(self) -> LayerCache:
        return LayerCache(self.keys, self.values, None, self.key_buffer, self.value_buffer)


def frame_attention(q: Tensor, k_frame: Tensor, v_frame: Tensor,
                    compressed_cache: tuple[Tensor, Tensor] | None, plan: WindowPlan,
                    rotary: Rotary, compressor: CompressedMemory | None, *, scale: float,
                    flash: bool, dropout: float = 0.0) -> tuple[Tensor, LayerCache]:
    """The attention of a general call: the new queries q (b, n, h, d) over the frames of keys
    and values (`WindowPlan.frame`) and the compressed memory; q and k come rotated. Returns
    the output (b, n, h, d) and the layer's next cache."""
    compressed, next_comp = None, None
    if compressor is not None:
        compressed, next_comp = compressor.extend(k_frame, v_frame, compressed_cache, plan,
                                                  rotary)
    y = window_attention(q, k_frame, v_frame, plan, rotary, scale=scale, flash=flash,
                         dropout=dropout, compressed=compressed,
                         c=compressor.c if compressor is not None else 1)
    keys, back = plan.next_cache(k_frame), plan.cache_shift
    keys = keys if back == 0 else rotary.shift(keys, back)
    return y, LayerCache(keys, plan.next_cache(v_frame), next_comp)


class WindowAttention(nn.Module):
    """An ordinary layer's attention: pre-normed input -> q, k, v -> window attention -> out."""

    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        h, d = config.heads, config.dim_head
        self.heads, self.dim_head = h, d
        self.flash, self.dropout = config.use_flash_attn, config.dropout
        self.qkv = nn.Linear(config.dim, 3 * h * d, bias=False)
        self.out = nn.Linear(h * d, config.dim, bias=False)
        self.rotary = Rotary(d, config.block_width, config.rotary_base)
        self.compressor = CompressedMemory(config) if config.use_compressed_mem else None

    def forward(self, x: Tensor, cache: LayerCache, plan: WindowPlan) -> tuple[Tensor, LayerCache]:
        """x (b, n, e) normed tokens and this layer's cache from the last call -> the output
        (b, n, e) and the next cache."""
        b, n, _ = x.shape
        h, scale = self.heads, self.dim_head ** -0.5
        drop = self.dropout if self.training else 0.0
        qkv = self.qkv(x).view(b, n, 3 * h, self.dim_head)
        qk = self.rotary(qkv[:, :, :2 * h], plan.L)  # at positions after the L cached tokens
        q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, 2 * h:]
        y, cache = frame_attention(q, plan.frame(cache.keys, k), plan.frame(cache.values, v),
                                   cache.compressed, plan, self.rotary, self.compressor,
                                   scale=scale, flash=self.flash, dropout=drop)
        return self.out(y.reshape(b, n, -1)), cache

    def step(self, x: Tensor, xn: Tensor, cos: Tensor, sin: Tensor, window) -> Tensor:
        """The decoding step of `forward` for one token: x (b, e) the residual stream, xn its
        norm, (cos, sin) the rotation of the token's position; window(q, k, v, scale) writes the
        token's key and value to the cache and attends (`CacheStep`, or the compiled step's).
        Returns x plus the attention output (the residual addition fused into the projection)."""
        qkv = F.linear(xn, self.qkv.weight).view(x.shape[0], 3, self.heads, self.dim_head)
        qk = Rotary.rotate(qkv[:, :2], cos, sin)  # (b, 2, h, d)
        y = window(qk[:, 0], qk[:, 1], qkv[:, 2], self.dim_head ** -0.5)
        return torch.addmm(x, y, self.out.weight.t())
