"""Sliding-window causal attention over [previous block; block], with rotary positions.

Axis letters: b batch, n new tokens of a call, f frame positions, k blocks, m queries per block,
j keys per block, h heads, d head width, e model width, s state slots.

Every call works on a *frame*: one empty block, then the layer's cache (the previous complete block
and the current partial block, L < 2W tokens, starting on a block boundary), then the n new tokens.
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

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BlockRecurrentConfig


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, flash: bool,
           dropout: float = 0.0) -> Tensor:
    """Softmax attention. q (..., h, m, d), k/v (..., h, j, d), mask broadcastable to
    (..., h, m, j) with True = may attend. The plain path is the reference for the fused one."""
    if flash:
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
        return self._rotate(x, self.cos[start:start + m, None], -sin if inverse else sin)

    def shift(self, x: Tensor, back: int) -> Tensor:
        """Every vector of x (..., h, d) turned back by `back` positions (one angle for all)."""
        self._fit(back + 1)
        return self._rotate(x, self.cos[back], -self.sin[back])

    def at(self, x: Tensor, pos: Tensor) -> Tensor:
        """x (..., h, d) at positions pos, which broadcasts against x.shape[:-2]."""
        self._fit(int(pos.max()) + 1)
        return self._rotate(x, self.cos[pos][..., None, :], self.sin[pos][..., None, :])

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): three kernels instead of five
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


@functools.lru_cache(maxsize=4096)
@torch.inference_mode(False)  # the cached mask may later be used with autograd
def _band(W: int, q_off: int, q_len: int, sliding: bool, device: torch.device) -> Tensor:
    """(m, j) True where query q_off+i of a block may read key j, counted from the start of the
    previous block: the window (i + q_off, i + q_off + W] if sliding, else [0, i + q_off + W].
    Cached: decoding asks for the same few hundred masks over and over; callers never modify it."""
    q = torch.arange(q_off, q_off + q_len, device=device)
    j = torch.arange(W + q_off + q_len, device=device)
    causal = j[None, :] <= q[:, None] + W
    return causal & (j[None, :] > q[:, None]) if sliding else causal


@dataclass
class Part:
    """A run of query blocks k_first .. k_first+count-1 (frame block numbers), each with queries at
    offsets q_off .. q_off+q_len-1 inside its block and keys from the start of the block before."""
    k_first: int
    count: int
    q_off: int
    q_len: int
    window_mask: Tensor  # (b|1, count, 1, q_len, W+q_off+q_len)
    compressed_mask: Tensor | None = None  # (b|1, count, 1, 1, W)


class WindowPlan:
    """Where a call's new tokens fall in the frame, and the masks every layer shares.

    `lengths` (b,) counts the tokens of each row's current document seen before this call; a row
    whose document started inside the cache (or at this call) must not read keys before it."""

    def __init__(self, config: BlockRecurrentConfig, cache_len: int, n: int, lengths: Tensor):
        W = config.block_width
        self.W, self.L, self.n = W, cache_len, n
        self.sliding = config.window == "sliding"
        self.a, self.e = W + cache_len, W + cache_len + n  # frame positions of the new tokens
        self.num_blocks = math.ceil(self.e / W)  # frame blocks, the empty block 0 included
        self.frame_len = self.num_blocks * W
        # First frame position of each row's document; the empty block 0 is never valid.
        self.doc_start = (self.a - lengths).clamp(min=W)  # (b,)
        self.compressed_start = self.a - lengths  # compressed blocks may predate the cache
        self.all_valid = bool((self.doc_start == W).all())
        self.compress = config.use_compressed_mem
        self.compress_factor = config.compressed_mem_factor
        # The next cache starts at the last complete block (W <= its length < 2W) or, before the
        # first complete block of a document, at frame position W.
        self.first_cached_block = max(1, self.e // W - 1)
        # A decoding step: one token that completes no block, in a document that started at or
        # before the cache. It reads the cache's last keys from `step_keys` on, plus its own:
        # no frame, no masks (`step_attention`), and the state does not move. The cache holds
        # the previous complete block and the token's own block so far: all a "block" window reads.
        self.single = self.is_step(config, cache_len, n, self.all_valid)
        self.step_keys = self.step_start(config, cache_len)
        self.parts = [] if self.single else self._split(config)
        # The frame is materialised from `origin` on: keys before the first query block's window
        # are never read (most of the frame when decoding), except by the compressor, which
        # works on whole blocks of the whole frame.
        self.origin = 0 if self.compress or self.single else (self.parts[0].k_first - 1) * W

    @staticmethod
    def is_step(config: BlockRecurrentConfig, cache_len: int, n: int, all_valid: bool) -> bool:
        """A call that `step_attention` serves: one token that completes no block, every row's
        document started at or before the cache, no compressed memory."""
        return (n == 1 and all_valid and not config.use_compressed_mem
                and (cache_len + 1) % config.block_width != 0)

    @staticmethod
    def step_start(config: BlockRecurrentConfig, cache_len: int) -> int:
        """The first cache position a decoding step reads (then the rest and its own key)."""
        return max(0, cache_len + 1 - config.block_width) if config.window == "sliding" else 0

    def _split(self, config) -> list[Part]:
        """Queries [a, e) as a partial head block, a run of full blocks, and a partial tail."""
        W, a, e = self.W, self.a, self.e
        parts, pos = [], a
        while pos < e:
            k, off = divmod(pos, W)
            if off == 0 and e - pos >= W:
                count = (e - pos) // W
                parts.append(self._part(k, count, 0, W))
                pos += count * W
            else:
                q_len = min(e, (k + 1) * W) - pos
                parts.append(self._part(k, 1, off, q_len))
                pos += q_len
        return parts

    def _part(self, k_first: int, count: int, q_off: int, q_len: int) -> Part:
        W, dev = self.W, self.doc_start.device
        ks = torch.arange(k_first, k_first + count, device=dev)
        band = _band(W, q_off, q_len, self.sliding, dev)  # (m, j), shared read-only between calls
        if self.all_valid and k_first >= 2:
            mask = band[None, None, None]
        else:
            j = torch.arange(W + q_off + q_len, device=dev)  # key offset from the previous block
            key_pos = (ks[:, None] - 1) * W + j[None, :]  # (k, j) frame positions
            valid = key_pos[None] >= self.doc_start[:, None, None]  # (b, k, j)
            mask = band[None, None, None] & valid[:, :, None, None, :]
        cmask = None
        if self.compress:
            # Block k reads the compressed blocks k-1-c .. k-2, i.e. the c blocks before its window.
            c = self.compress_factor
            src = ks[:, None] - 1 - c + torch.arange(c, device=dev)[None, :]  # (k, c) frame blocks
            ok = (src[None] * W >= self.compressed_start[:, None, None]) & (src[None] >= 1 - c)
            cmask = ok[..., None].expand(*ok.shape, W // c).reshape(ok.shape[0], count, 1, 1, W)
        return Part(k_first, count, q_off, q_len, mask, cmask)

    def state_key_mask(self, k: int) -> Tensor | None:
        """(b, 1, 1, 2W) validity of the token keys of blocks k-1 and k, read by the state;
        None when all are valid (no mask lets attention skip the masking work)."""
        if self.all_valid and k >= 2:
            return None
        pos = (k - 1) * self.W + torch.arange(2 * self.W, device=self.doc_start.device)
        return (pos[None] >= self.doc_start[:, None])[:, None, None, :]

    # --- frames and caches -------------------------------------------------------------------
    def frame(self, cached: Tensor | None, new: Tensor) -> Tensor:
        """(b, f, h, d), frame positions origin .. e-1: zeros for block 0, the cache, the new
        tokens; with compressed memory from 0 and padded with zeros to whole blocks."""
        b, _, h, d = new.shape
        W, pieces = self.W, []
        if self.origin < W:
            pieces.append(new.new_zeros(b, W - self.origin, h, d))
        skip = max(0, self.origin - W)  # cached tokens before the origin
        if cached is not None and cached.shape[1] > skip:
            pieces.append(cached[:, skip:].to(new.dtype))
        pieces.append(new)
        if self.compress and self.frame_len > self.e:
            pieces.append(new.new_zeros(b, self.frame_len - self.e, h, d))
        return torch.cat(pieces, dim=1)

    def next_cache(self, frame: Tensor, rotary: Rotary | None = None) -> Tensor:
        """What the next call needs: the last complete block and the partial one after it.
        Keys (with `rotary`) are turned back to positions counted from the new cache start."""
        first = self.first_cached_block * self.W
        out = frame[:, first - self.origin:self.e - self.origin]
        return out if rotary is None or first == self.W else rotary.shift(out, first - self.W)


class CompressedMemory(nn.Module):
    """Older blocks compressed c:1 by a strided convolution (Compressive Transformer, Rae et al.
    2019): each block of W keys/values becomes W/c slots, and each query block also reads the c
    compressed blocks just before its window, extending its reach by c*W tokens at the cost of W
    extra keys. Compressed keys carry no rotation (window position 0, the oldest)."""

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
               plan: WindowPlan, rotary: Rotary):
        """All compressed blocks of the frame, indexed so that frame block i is at i + c:
        one never-valid block, the c cached blocks (frame blocks 1-c .. 0), then blocks 1 ...
        The frame's keys are rotated; the compressor reads them as they were before rotation.
        Returns ((k, v) each (b, blocks, W/c, h, d), the cache for the next call)."""
        W, c = plan.W, self.c
        b, f, h, d = k_frame.shape
        out = []
        raw_keys = rotary(k_frame[:, W:], 0, inverse=True)
        for conv, frame, i in ((self.conv_k, raw_keys, 0), (self.conv_v, v_frame[:, W:], 1)):
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


def window_attention(q: Tensor, k_frame: Tensor, v_frame: Tensor, plan: WindowPlan,
                     rotary: Rotary, *, scale: float, flash: bool, dropout: float = 0.0,
                     compressed: tuple[Tensor, Tensor] | None = None, c: int = 1) -> Tensor:
    """Sliding-window attention of the new queries q (b, n, h, d) over the frame's keys and
    values (b, f, h, d), plus compressed memory if given. Queries and keys come rotated (frame
    position f at f - W); `rotary` places the compressed keys. Returns (b, n, h, d)."""
    W, b = plan.W, q.shape[0]
    # Keys before the first query block's window are never read (most of the frame when decoding).
    lo = (plan.parts[0].k_first - 1) * W
    k_frame, v_frame = k_frame[:, lo - plan.origin:], v_frame[:, lo - plan.origin:]
    outs, done = [], 0
    for part in plan.parts:
        m, kc = part.q_len, part.count
        qp = q[:, done:done + kc * m].view(b, kc, m, *q.shape[2:])  # (b, k, m, h, d)
        done += kc * m
        k0 = (part.k_first - 1) * W - lo  # keys from the start of the previous block
        if kc == 1:
            keys = slice(k0, k0 + W + part.q_off + m)
            kp, vp = k_frame[:, keys].unsqueeze(1), v_frame[:, keys].unsqueeze(1)  # (b, 1, j, h, d)
        else:  # full blocks: keys of block k-1 and block k side by side
            blocks = lambda t: t[:, k0:k0 + (kc + 1) * W].view(b, kc + 1, W, *t.shape[2:])
            kb, vb = blocks(k_frame), blocks(v_frame)
            kp = torch.cat([kb[:, :-1], kb[:, 1:]], dim=2)  # (b, k, 2W, h, d)
            vp = torch.cat([vb[:, :-1], vb[:, 1:]], dim=2)
        mask = part.window_mask
        if compressed is not None:
            # Compressed keys all sit at the start of each block's window (its oldest position);
            # block 1's window starts in the empty block 0, where nothing is valid.
            starts = ((part.k_first - 2 + torch.arange(kc, device=q.device)) * W).clamp(min=0)
            ck = rotary.at(CompressedMemory.gather(compressed[0], part, c),
                           starts[:, None].expand(kc, W))
            cv = CompressedMemory.gather(compressed[1], part, c)
            kp, vp = torch.cat([ck, kp], dim=2), torch.cat([cv, vp], dim=2)
            lead = torch.broadcast_shapes(mask.shape[:2], part.compressed_mask.shape[:2])
            mask = torch.cat([part.compressed_mask.expand(*lead, 1, m, W),
                              mask.expand(*lead, *mask.shape[2:])], dim=-1)
        t = lambda x: x.transpose(2, 3)  # (b, k, h, ., d)
        out = attend(t(qp), t(kp), t(vp), mask, scale, flash, dropout)
        outs.append(t(out).reshape(b, kc * m, *q.shape[2:]))
    return cat(outs, dim=1)


def append(cache: Tensor | None, new: Tensor, capacity: int) -> Tensor:
    """cache (b, L, h, d) followed by new (b, 1, h, d), as a view of a buffer of `capacity`
    positions. Without autograd the token is written in place when `cache` is the longest view
    yet taken of its buffer, so that no existing view can see the write; otherwise (memories
    passed to a second call, copied, or from a full forward) it is copied into a new buffer.
    Either way every memory handed out earlier keeps its values. A decoding step thus copies
    one token, not its whole cache."""
    L = 0 if cache is None else cache.shape[1]
    if torch.is_grad_enabled():
        return new if cache is None else torch.cat([cache.to(new.dtype), new], dim=1)
    buf = getattr(cache, "_buffer", None)
    if buf is None or buf._fill != L or buf.dtype != new.dtype or L >= buf.shape[1]:
        buf = new.new_empty(new.shape[0], max(capacity, L + 1), *new.shape[2:])
        if L:
            buf[:, :L] = cache
    buf[:, L:L + 1] = new
    buf._fill = L + 1
    out = buf[:, :L + 1]
    out._buffer = buf
    return out


def step_attention(q: Tensor, k: Tensor, v: Tensor, cache: tuple, plan: WindowPlan, *,
                   scale: float, flash: bool, dropout: float = 0.0
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The attention of a decoding step (`plan.single`): the query q (b, 1, h, d) reads the last
    keys of the cache and its own key k; q and k come rotated. Returns the output (b, 1, h, d)
    and the next cache's keys and values: the cache grown by the new token."""
    keys, values = (append(c, new, 2 * plan.W) for c, new in ((cache[0], k), (cache[1], v)))
    t = lambda x: x[:, plan.step_keys:].transpose(1, 2)  # (b, h, j, d)
    out = attend(q.transpose(1, 2), t(keys), t(values), None, scale, flash, dropout)
    return out.transpose(1, 2), keys, values


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

    def forward(self, x: Tensor, cache: tuple, plan: WindowPlan):
        """x (b, n, e); cache = (keys, values, compressed or None) from the last call."""
        b, n, _ = x.shape
        h, scale = self.heads, self.dim_head ** -0.5
        drop = self.dropout if self.training else 0.0
        qkv = self.qkv(x).view(b, n, 3 * h, self.dim_head)
        qk = self.rotary(qkv[:, :, :2 * h], plan.L)  # at positions after the L cached tokens
        q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, 2 * h:]
        if plan.single:
            y, keys, values = step_attention(q, k, v, cache, plan, scale=scale, flash=self.flash,
                                             dropout=drop)
            return self.out(y.reshape(b, n, -1)), (keys, values, None)
        k_frame, v_frame = plan.frame(cache[0], k), plan.frame(cache[1], v)
        compressed, next_comp = None, None
        if self.compressor is not None:
            compressed, next_comp = self.compressor.extend(k_frame, v_frame, cache[2], plan,
                                                           self.rotary)
        y = window_attention(q, k_frame, v_frame, plan, self.rotary, scale=scale,
                             flash=self.flash, dropout=drop,
                             compressed=compressed, c=self.compressor.c if self.compressor else 1)
        y = self.out(y.reshape(b, n, -1))
        return y, (plan.next_cache(k_frame, self.rotary), plan.next_cache(v_frame), next_comp)
