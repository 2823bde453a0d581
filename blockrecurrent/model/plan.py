"""WindowPlan: where a call's new tokens fall in the frame; every computation on frame positions.

Axis letters as in attention.py: b batch, f frame positions, k blocks, m queries per block, j keys
per block, h heads, d head width.

A call works on a *frame*: one empty block (block 0), then the layer's cache (the previous
complete block and the current partial block, L < 2W tokens, starting on a block boundary), then
the n new tokens at frame positions `start` .. `end`-1. Frame block `blk` covers positions
blk*W .. blk*W+W-1; its queries read keys from the start of block blk-1 (its *window*). Rotary
positions count from the start of the cache: frame position f sits at rotary position f - W.
The frame is materialised from `origin` on, so frame position f is index f - origin of a
materialised frame tensor. The methods below are the only place these numbers are computed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import BlockRecurrentConfig


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

    @property
    def blocks(self) -> range:
        """The frame block numbers of the part."""
        return range(self.k_first, self.k_first + self.count)

    @property
    def num_queries(self) -> int:
        return self.count * self.q_len


class WindowPlan:
    """Where a call's new tokens fall in the frame, and the masks every layer shares.

    `lengths` (b,) counts the tokens of each row's current document seen before this call; a row
    whose document started inside the cache (or at this call) must not read keys before it."""

    def __init__(self, config: BlockRecurrentConfig, cache_len: int, n: int, lengths: Tensor):
        W = config.block_width
        self.W, self.L, self.n = W, cache_len, n
        self.sliding = config.window == "sliding"
        # Frame positions of the new tokens: start .. end-1.
        self.start, self.end = W + cache_len, W + cache_len + n
        self.num_blocks = math.ceil(self.end / W)  # frame blocks, the empty block 0 included
        self.frame_len = self.num_blocks * W
        # First frame position of each row's document; the empty block 0 is never valid.
        self.doc_start = (self.start - lengths).clamp(min=W)  # (b,)
        self.compressed_start = self.start - lengths  # compressed blocks may predate the cache
        self.all_valid = bool((self.doc_start == W).all())
        self.compress = config.use_compressed_mem
        self.compress_factor = config.compressed_mem_factor
        self.first_cached_block = self._first_cached_block(W, self.end)
        self.parts = self._split()
        # The frame is materialised from `origin` on: keys before the first query block's window
        # are never read (most of the frame for a few tokens), except by the compressor, which
        # works on whole blocks of the whole frame.
        self.origin = 0 if self.compress else self.first_window

    @staticmethod
    def is_step(config: BlockRecurrentConfig, cache_len: int, n: int, all_valid: bool) -> bool:
        """A call that the decoding step serves (BlockRecurrentTransformer.step): one token that
        completes no block, so the state stays, every row's document started at or before the
        cache, so no key is masked, and no compressed memory. The cache then holds the previous
        complete block and the token's own block so far: all a window reads."""
        return (n == 1 and all_valid and not config.use_compressed_mem
                and (cache_len + 1) % config.block_width != 0)

    @staticmethod
    def _first_cached_block(W: int, end: int) -> int:
        """The next cache starts at the last complete block (W <= its length < 2W) or, before the
        first complete block of a document, at frame position W (block 1)."""
        return max(1, end // W - 1)

    @staticmethod
    def next_cache_len(block_width: int, cache_len: int, n: int) -> int:
        """The length of the cache after a call of n tokens on a cache of cache_len tokens."""
        end = block_width + cache_len + n
        return end - WindowPlan._first_cached_block(block_width, end) * block_width

    @staticmethod
    def step_start(config: BlockRecurrentConfig, cache_len: int) -> int:
        """The first cache position a decoding step reads (then the rest and its own key)."""
        return max(0, cache_len + 1 - config.block_width) if config.window == "sliding" else 0

    # --- frame positions -------------------------------------------------------------------
    def block_start(self, blk: int) -> int:
        """The frame position of the first token of frame block `blk`."""
        return blk * self.W

    def window_start(self, blk: int) -> int:
        """The frame position of the first key that block `blk`'s queries read (block blk-1)."""
        return (blk - 1) * self.W

    def rotary_position(self, pos: int) -> int:
        """The rotary position of frame position `pos` (counted from the start of the cache)."""
        return pos - self.W

    def index(self, pos: int) -> int:
        """The index of frame position `pos` in a frame materialised from `origin` (`frame`)."""
        return pos - self.origin

    def completes(self, blk: int) -> bool:
        """Whether frame block `blk` is complete at the end of this call."""
        return self.block_start(blk + 1) <= self.end

    @property
    def first_window(self) -> int:
        """The first frame position any query of the call reads."""
        return self.window_start(self.parts[0].k_first)

    @property
    def query_blocks(self) -> list[int]:
        """Every frame block with new tokens, in order."""
        return [blk for part in self.parts for blk in part.blocks]

    def window_rotary_starts(self, part: Part, device: torch.device) -> Tensor:
        """(count,) the rotary position of the start of each window of the part, where its
        compressed keys sit; block 1's window starts in the empty block 0 (clamped to 0)."""
        blocks = part.k_first + torch.arange(part.count, device=device)
        return (self.rotary_position(0) + (blocks - 1) * self.W).clamp(min=0)

    # --- query parts and masks -------------------------------------------------------------
    def _split(self) -> list[Part]:
        """Queries [start, end) as a partial head block, a run of full blocks, a partial tail."""
        W, end = self.W, self.end
        parts, pos = [], self.start
        while pos < end:
            blk, off = divmod(pos, W)
            if off == 0 and end - pos >= W:
                count = (end - pos) // W
                parts.append(self._part(blk, count, 0, W))
                pos += count * W
            else:
                q_len = min(end, self.block_start(blk + 1)) - pos
                parts.append(self._part(blk, 1, off, q_len))
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

    def state_key_mask(self, blk: int) -> Tensor | None:
        """(b, 1, 1, 2W) validity of the token keys of blocks blk-1 and blk, read by the state;
        None when all are valid (no mask lets attention skip the masking work)."""
        if self.all_valid and blk >= 2:
            return None
        pos = self.window_start(blk) + torch.arange(2 * self.W, device=self.doc_start.device)
        return (pos[None] >= self.doc_start[:, None])[:, None, None, :]

    # --- frames and caches -------------------------------------------------------------------
    def frame(self, cached: Tensor | None, new: Tensor) -> Tensor:
        """(b, f, h, d), frame positions origin .. end-1: zeros for block 0, the cache, the new
        tokens; with compressed memory from 0 and padded with zeros to whole blocks."""
        b, _, h, d = new.shape
        W, pieces = self.W, []
        if self.origin < W:
            pieces.append(new.new_zeros(b, W - self.origin, h, d))
        skip = max(0, self.origin - W)  # cached tokens before the origin
        if cached is not None and cached.shape[1] > skip:
            pieces.append(cached[:, skip:].to(new.dtype))
        pieces.append(new)
        if self.compress and self.frame_len > self.end:
            pieces.append(new.new_zeros(b, self.frame_len - self.end, h, d))
        return torch.cat(pieces, dim=1)

    def blocks_of(self, frame: Tensor, first: int, stop: int) -> Tensor:
        """Frame blocks first .. stop-1 of a materialised frame (b, (stop-first) W, ...)."""
        return frame[:, self.index(self.block_start(first)):self.index(self.block_start(stop))]

    def next_cache(self, frame: Tensor) -> Tensor:
        """What the next call needs: the last complete block and the partial one after it.
        Keys must then be turned back by `cache_shift` positions (counted from the new start)."""
        return frame[:, self.index(self.block_start(self.first_cached_block)):self.index(self.end)]

    @property
    def cache_shift(self) -> int:
        """Rotary positions by which the next cache's keys are turned back."""
        return self.rotary_position(self.block_start(self.first_cached_block))
