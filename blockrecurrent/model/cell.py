"""The recurrent cell of the Block-Recurrent Transformer (Hutchins et al. 2022, section 3).

Axis letters: b batch, n new tokens, k blocks, s state slots, h heads, d head width, e model width.
In code, q/k/v are queries/keys/values (of tokens; sq/sk/sv of the state), `blk` a block number
and `gate_in` the joined attention outputs that a gate reads.

One layer with two directions over the block t (W tokens) and the state (S vectors):
- vertical (tokens): self-attention over the sliding window, plus cross-attention to the
  *incoming* state s_t; both results concatenated and projected, then the usual MLP.
- horizontal (state): cross-attention to the token keys/values of blocks t-1 and t, and (the
  paper's cell, `state_self_attention`) self-attention among the state vectors; projected to a
  candidate z and gated into s_{t+1}.
Keys/values are shared: token K/V serve token self-attention and the state's cross-attention,
state K/V serve state self-attention and the tokens' cross-attention; four query projections.

Because the state update reads only the layer's *input* tokens (their keys and values), the
states of all blocks of a call are computed first by a loop over blocks (S x 2W attention per
block, and S x S with state self-attention), and then every block's tokens are processed in
parallel. The loop is the only sequential work in the model.

Attention here L2-normalises queries and keys per head and multiplies by a learned per-head scale,
as the official code does; the scale starts at sqrt(d) so that scores have unit spread at
initialisation, like ordinary dot-product attention, instead of being nearly uniform (the
state's read of the tokens starts sharper: model.STATE_READ_GAIN).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (
    CompressedMemory,
    LayerCache,
    Rotary,
    WindowPlan,
    attend,
    cat,
    frame_attention,
    stack,
    unit,
)
from .config import BlockRecurrentConfig

StateKV = tuple[Tensor, Tensor]  # unit K_s and V_s of a state, each (b, s, h, d)

# Rows of RecurrentCell.scales, one per attention: the tokens' self-attention (window) and
# cross-attention to the state, the state's self-attention and its read of the tokens.
TOKEN_SELF, TOKEN_CROSS, STATE_SELF, STATE_READ = range(4)


class CellOutput(NamedTuple):
    """What `RecurrentCell.forward` returns."""
    y: Tensor  # (b, n, e) the token output
    cache: LayerCache  # the layer's next cache
    state: Tensor  # (b, s, e) the state after the last block that completes in the call
    state_kv: StateKV | None  # that state's (K_s, V_s) when the call ends inside a block


class BlockPass(NamedTuple):
    """What `RecurrentCell._blocks` returns for a general (non-step) call."""
    self_out: Tensor  # (b, n, h, d) the window self-attention output
    block_kv: list[StateKV]  # the (K_s, V_s) of each query block's incoming state
    state: Tensor  # (b, s, e) the state after the last complete block
    state_kv: StateKV | None  # its (K_s, V_s) if the call ends inside a block
    cache: LayerCache  # the layer's next cache


def retention_bias(shape, max_blocks: float = 64.0) -> Tensor:
    """Gate biases b with sigmoid(b) spread over timescales of 2 to `max_blocks` blocks: b =
    log(u), u ~ U(1, max_blocks - 1), the "chrono" initialisation of LSTM forget gates (Tallec &
    Ollivier 2018). A channel with g = sigmoid(b) keeps g^k of what it held k blocks ago; the
    paper's b ~ N(0, 0.1) starts every channel near g = 0.5 (1/32 left after 5 blocks), and Adam
    moves b by about lr per step, far too slowly to learn long retention in a short run."""
    return torch.empty(shape).uniform_(1.0, max_blocks - 1.0).log()


class FixedGate(nn.Module):
    """s' = s * g + z * w, g = sigmoid(b) a learned per-channel constant (Rec:fixed), with the
    write w = sqrt(1 - g^2) (gate_write="normalized", the default) or w = 1 - g (the paper's
    convex gate, "convex"). A channel keeps g^k of what it held k blocks ago either way; the convex
    write makes a slow channel (g = 0.97) take 3% of z per block and hold, in the long run,
    sqrt((1 - g) / (1 + g)) = 1/8 of z's spread, while the normalized one holds all of it in
    every channel (the input normalisation of the LRU, Orvieto et al. 2023)."""

    def __init__(self, config: BlockRecurrentConfig, input_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(config.dim))
        self.normalized = config.gate_write == "normalized"

    def forward(self, state: Tensor, z: Tensor, gate_in: Tensor) -> Tensor:
        g = torch.sigmoid(self.bias)
        if self.normalized:  # sqrt(1 - g^2) as sqrt(sigmoid(-b) (1 + g)): 1 - g rounds to 0 in
            # float32 from b ~ 17, sigmoid(-b) only from b ~ 88 (the biases start below log 63)
            return state * g + z * (torch.sigmoid(-self.bias) * (1 + g)).sqrt()
        return state * g + z * (1 - g)


class LSTMGate(nn.Module):
    """s' = s * f + z * i with f = sigmoid(W_f x + b_f + 1), i = sigmoid(W_i x + b_i - 1)
    (Rec:lstm), x = `gate_in`. The +1/-1 offsets bias the cell towards remembering at
    initialisation."""

    def __init__(self, config: BlockRecurrentConfig, input_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, 2 * config.dim)

    def forward(self, state: Tensor, z: Tensor, gate_in: Tensor) -> Tensor:
        f, i = self.proj(gate_in).chunk(2, dim=-1)
        return state * torch.sigmoid(f + 1) + z * torch.sigmoid(i - 1)


GATES = {"fixed": FixedGate, "lstm": LSTMGate}


class GEGLU(nn.Module):
    """a * gelu(g) over the two halves (a, g) of the input (Shazeer 2020, "GLU variants")."""
    approximate = "none"  # as nn.GELU's attribute

    def forward(self, x: Tensor) -> Tensor:
        return mlp_activation(x, *activation_kind(self))


def activation_kind(act: nn.Module) -> tuple[bool, str]:
    """(gated, approximate) of an MLP's activation module (nn.GELU or GEGLU)."""
    return isinstance(act, GEGLU), act.approximate


def mlp_activation(h: Tensor, gated: bool, approximate: str = "none") -> Tensor:
    """The middle of an MLP: GELU, or GEGLU's gated GELU."""
    if gated:
        a, g = h.chunk(2, dim=-1)
        return a * F.gelu(g, approximate=approximate)
    return F.gelu(h, approximate=approximate)


def mlp_widths(config: BlockRecurrentConfig) -> tuple[int, int]:
    """(width of the up projection's output, hidden width) of an MLP. "geglu" gives each of its
    two halves 2/3 of the GELU MLP's hidden width: the same parameters and FLOPs."""
    if config.mlp == "geglu":
        hidden = int(config.mlp_mult * config.dim * 2 / 3)
        return 2 * hidden, hidden
    hidden = int(config.mlp_mult * config.dim)
    return hidden, hidden


class MLP(nn.Sequential):
    """Linear -> GELU or GEGLU -> Linear, no biases. A Sequential, so that saved weights keep
    their names (mlp.0.weight, mlp.2.weight)."""

    def __init__(self, config: BlockRecurrentConfig):
        up, hidden = mlp_widths(config)
        act = GEGLU() if config.mlp == "geglu" else nn.GELU()
        super().__init__(nn.Linear(config.dim, up, bias=False), act,
                         nn.Linear(hidden, config.dim, bias=False))

    def step(self, x: Tensor, xn: Tensor) -> Tensor:
        """x + MLP(xn) for one token, x and xn (b, e): the residual addition fused into the
        down projection (the decoding step's form of the layer's `x + mlp(norm(x))`)."""
        up, act, down = self._modules.values()
        hid = mlp_activation(F.linear(xn, up.weight), *activation_kind(act))
        return torch.addmm(x, hid, down.weight.t())


def normed(x: Tensor, scale: Tensor) -> Tensor:
    """L2-normalise over the head width and multiply by a per-head scale. x (..., h, d)."""
    return unit(x) * scale[:, None].to(x.dtype)


class RecurrentCell(nn.Module):
    def __init__(self, config: BlockRecurrentConfig):
        super().__init__()
        h, d, e, s = config.heads, config.dim_head, config.dim, config.num_state_vectors
        self.heads, self.dim_head = h, d
        self.flash, self.dropout = config.use_flash_attn, config.dropout
        self.variant = config.variant
        # Token side (vertical): K_e, V_e, Q_e (self), Q2_e (cross to state).
        self.token_proj = nn.Linear(e, 4 * h * d, bias=False)
        self.token_out = nn.Linear(2 * h * d, e, bias=False)
        # State side (horizontal): K_s, V_s, Q_s (self; none without state self-attention), Q2_s
        # (cross to tokens).
        self.state_self = config.state_self_attention
        reads = 2 if self.state_self else 1  # attention outputs the candidate z is made from
        self.state_norm = nn.LayerNorm(e)
        self.state_proj = nn.Linear(e, (2 + reads) * h * d, bias=False)
        self.state_out = nn.Linear(reads * h * d, e, bias=False)
        self.state_ids = nn.Parameter(torch.empty(s, e))  # learned "position" of each slot
        self.initial_state = nn.Parameter(torch.empty(s, e))  # the state at document start
        # Per-head scales, rows TOKEN_SELF ... STATE_READ (the STATE_SELF row stays unused
        # without state self-attention: saved shapes are the same).
        self.scales = nn.Parameter(torch.full((4, h), math.sqrt(d)))
        self.gate = GATES[config.gate](config, reads * h * d)
        if config.variant == "dual":  # a state MLP with its own gate after the attention gate
            self.mlp_norm = nn.LayerNorm(e)
            self.state_mlp = MLP(config)
            self.mlp_gate = GATES[config.gate](config, e)
        self.rotary = Rotary(d, config.block_width, config.rotary_base)
        self.compressor = CompressedMemory(config) if config.use_compressed_mem else None

    def state_projections(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """state (b, s, e) -> K_s, V_s, Q_s, Q2_s, each (b, s, h, d); Q_s is None without state
        self-attention. No dropout on this side."""
        b, s, _ = state.shape
        x = self.state_norm(state) + self.state_ids.to(state.dtype)
        parts = self.state_proj(x).view(b, s, -1, self.heads, self.dim_head).unbind(2)
        return parts if self.state_self else (parts[0], parts[1], None, parts[2])

    def state_keys_values(self, state: Tensor) -> StateKV:
        """Unit K_s and V_s only, each (b, s, h, d): all that the tokens of a block read. Half
        of `state_projections`, whose output rows are ordered K_s, V_s, [Q_s,] Q2_s."""
        b, s, _ = state.shape
        x = self.state_norm(state) + self.state_ids.to(state.dtype)
        w = self.state_proj.weight[:2 * self.heads * self.dim_head]
        sk, sv = F.linear(x, w).view(b, s, 2, self.heads, self.dim_head).unbind(2)
        return unit(sk), sv

    def update(self, state: Tensor, sk: Tensor, sv: Tensor, sq: Tensor | None, sq2: Tensor,
               tk: Tensor, tv: Tensor, key_mask: Tensor) -> Tensor:
        """One step of the state: s_t -> s_{t+1}, reading the token keys/values tk, tv
        (b, 2W, h, d) of blocks t-1 and t (and itself, unless sq is None). Returns (b, s, e)."""
        t = lambda x: x.transpose(1, 2)  # (b, h, ., d)
        reads = []  # per head: [self,] cross
        if sq is not None:
            reads.append(attend(t(normed(sq, self.scales[STATE_SELF])), t(sk), t(sv), None, 1.0,
                                self.flash))
        reads.append(attend(t(normed(sq2, self.scales[STATE_READ])), t(tk), t(tv), key_mask, 1.0,
                            self.flash))
        gate_in = torch.cat([t(r) for r in reads], dim=-1).flatten(2)  # (b, s, reads*h*d)
        new = self.gate(state, self.state_out(gate_in), gate_in)
        if self.variant == "dual":
            z = self.state_mlp(self.mlp_norm(new))
            new = self.mlp_gate(new, z, z)
        return new

    def forward(self, x: Tensor, cache: LayerCache, plan: WindowPlan, state: Tensor,
                state_kv: StateKV | None = None) -> CellOutput:
        """x (b, n, e) normed tokens, cache this layer's cache from the last call, state (b, s, e)
        the incoming state of the block holding the first new token, state_kv its (K_s, V_s) if
        known (from the last call). A decoding step returns the state_kv it read, so that the
        next step reuses them instead of projecting S state vectors again for every token."""
        b, n, _ = x.shape
        k, v, q, q2 = self.token_proj(x).view(b, n, 4, self.heads, self.dim_head).unbind(2)
        # Unit keys, queries with the learned scale; window attention reads them rotated (the
        # cache holds rotated keys).
        q = self.rotary(normed(q, self.scales[TOKEN_SELF]), plan.L)
        k = self.rotary(unit(k), plan.L)
        drop = self.dropout if self.training else 0.0
        self_out, block_kv, state, state_kv, next_cache = self._blocks(
            q, k, v, cache, plan, state, state_kv, drop)
        parts = [(part.count, part.q_len) for part in plan.parts]
        cross = self._cross(q2, block_kv, parts, drop)
        y = self.token_out(torch.cat([self_out.reshape(b, n, -1), cross], dim=-1))
        return CellOutput(y, next_cache, state, state_kv)

    def step(self, x: Tensor, xn: Tensor, cos: Tensor, sin: Tensor, window,
             state_kv: StateKV) -> Tensor:
        """The decoding step of `forward` for one token, which completes no block (the state
        stays): x (b, e) the residual stream, xn its norm, (cos, sin) the rotation of the token's
        position, window as in WindowAttention.step, state_kv the state's (K_s, V_s). Returns x
        plus the cell's token output."""
        b, h, d = x.shape[0], self.heads, self.dim_head
        kvqq = F.linear(xn, self.token_proj.weight).view(b, 4, h, d)
        units = unit(kvqq)  # k, q, q2 unit vectors (v's is not used)
        kq = Rotary.rotate(units[:, 0:3:2], cos, sin)  # (b, 2, h, d): rotated k and q
        scales = self.scales.to(x.dtype)
        y = window(kq[:, 1] * scales[TOKEN_SELF][:, None], kq[:, 0], kvqq[:, 1], 1.0)
        q2 = units[:, 3] * scales[TOKEN_CROSS][:, None]
        cross = attend(q2[:, :, None], state_kv[0].transpose(1, 2), state_kv[1].transpose(1, 2),
                       None, 1.0, self.flash).view(b, h * d)
        return torch.addmm(x, torch.cat([y, cross], dim=-1), self.token_out.weight.t())

    def _cross(self, q2: Tensor, block_kv: list[StateKV], parts: list[tuple[int, int]],
               drop: float) -> Tensor:
        """The tokens' cross-attention to the state: every block's tokens read the state that
        block started from, (K_s, V_s) in block_kv. q2 (b, n, h, d); parts: (blocks, queries per
        block) of each run of query blocks. Returns (b, n, h*d)."""
        b = q2.shape[0]
        cross_out, done, i = [], 0, 0
        for count, m in parts:
            # (b, k, s, h, d); a view when the part is one block
            sk, sv = (stack(t, dim=1) for t in zip(*block_kv[i:i + count], strict=True))
            qp = normed(q2[:, done:done + count * m], self.scales[TOKEN_CROSS]).view(b, count, m,
                                                                          *q2.shape[2:])
            out = attend(qp.transpose(2, 3), sk.transpose(2, 3), sv.transpose(2, 3), None, 1.0,
                         self.flash, drop)
            cross_out.append(out.transpose(2, 3).reshape(b, count * m, -1))
            done, i = done + count * m, i + count
        return cat(cross_out, dim=1)

    def _token_windows(self, k_frame: Tensor, v_frame: Tensor, plan: WindowPlan,
                       complete: list[int]) -> list[tuple[Tensor, ...]]:
        """For keys and values: the token keys/values of blocks t-1 and t, (b, 2W, h, d), for
        every complete block t, in order. Split once: slicing the frame per block gives each
        block a frame-sized zero-filled gradient in the backward pass (quadratic in blocks per
        call); unbind's backward is one stack. The state reads keys without positions: the
        rotation is undone (block 0 is all zeros)."""
        W = plan.W
        lo, hi = complete[0], complete[-1] + 1
        first = max(lo - 1, 1)  # the first block with keys (block 0 is empty)
        windows = []
        for fr in (k_frame, v_frame):
            fb = plan.blocks_of(fr, first, hi)
            if fr is k_frame:
                fb = self.rotary(fb, plan.rotary_position(plan.block_start(first)), inverse=True)
            if first > lo - 1:  # the window of block 1 starts with the empty block 0
                fb = torch.cat([fb.new_zeros(fb.shape[0], W, *fb.shape[2:]), fb], dim=1)
            fb = fb.view(fb.shape[0], hi - lo + 1, W, *fr.shape[2:])
            windows.append(torch.cat([fb[:, :-1], fb[:, 1:]], dim=2).unbind(1))
        return windows

    def _blocks(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, plan: WindowPlan,
                state: Tensor, state_kv: StateKV | None, drop: float) -> BlockPass:
        """A call over the frame: the state through every block that completes, then window
        attention of all blocks at once. q, k rotated."""
        k_frame, v_frame = plan.frame(cache.keys, k), plan.frame(cache.values, v)

        # Horizontal direction: the state of every block of the call, in order.
        blocks = plan.query_blocks
        complete = [blk for blk in blocks if plan.completes(blk)]  # a prefix of blocks
        if complete:
            key_windows, value_windows = self._token_windows(k_frame, v_frame, plan, complete)
        block_kv = []  # (K_s, V_s) of each query block's incoming state
        for blk in blocks:
            if complete and blk <= complete[-1]:  # block complete: advance the state
                sk, sv, sq, sq2 = self.state_projections(state)
                sk = unit(sk)
                block_kv.append((sk, sv))
                i = blk - complete[0]
                state = self.update(state, sk, sv, sq, sq2, key_windows[i], value_windows[i],
                                    plan.state_key_mask(blk))
                state_kv = None
            else:  # the call ends inside this block: its tokens only read K_s, V_s
                state_kv = state_kv if state_kv is not None else self.state_keys_values(state)
                block_kv.append(state_kv)

        # Vertical direction: all blocks at once.
        self_out, next_cache = frame_attention(q, k_frame, v_frame, cache.compressed, plan,
                                               self.rotary, self.compressor, scale=1.0,
                                               flash=self.flash, dropout=drop)
        return BlockPass(self_out, block_kv, state, state_kv, next_cache)
