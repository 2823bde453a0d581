"""A naive reference of the whole model, written straight from the paper's equations.

Slow and obvious on purpose: one block at a time, dense masked attention over the whole sequence
with absolute rotary positions, the state advanced by an explicit loop. It reads the parameters of
a `BlockRecurrentTransformer` and must give the same logits and states from a document's start
(one call, no carried memories). The tests compare the real model (banded windows, cached rotated
keys, the state loop before the token pass, fused attention) against it.

Axis letters: n tokens, s state slots, h heads, d head width, e model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate(x: Tensor, base: float) -> Tensor:
    """x (n, h, d) rotated at positions 0..n-1 (Su et al. 2021, halves paired)."""
    n, _, d = x.shape
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    cos, sin = (torch.cat([f(ang)] * 2, -1).float()[:, None] for f in (torch.cos, torch.sin))
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q (m, h, d), k/v (j, h, d), mask (m, j) True = may attend -> (m, h, d). No scaling here."""
    scores = torch.einsum("mhd,jhd->hmj", q, k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hmj,jhd->mhd", scores.softmax(-1), v)


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def window_mask(n: int, W: int, window: str = "sliding") -> Tensor:
    """Query i reads keys i-W < j <= i ("sliding"), or keys from the start of the block before
    its own up to itself ("block")."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    first = i - W + 1 if window == "sliding" else (i // W - 1) * W
    return (j <= i) & (j >= first)


def gate(module, state: Tensor, z: Tensor, h: Tensor, kind: str, write: str) -> Tensor:
    """The paper's gates: fixed s*g + z*(1-g), g = sigmoid(b) (write "normalized": z*sqrt(1-g^2)
    instead); lstm s*f + z*i with f = sigmoid(W_f h + b_f + 1), i = sigmoid(W_i h + b_i - 1)."""
    if kind == "fixed":
        g = torch.sigmoid(module.bias)
        return state * g + z * ((1 - g * g).sqrt() if write == "normalized" else 1 - g)
    wf, wi = module.proj.weight.chunk(2, 0)
    bf, bi = module.proj.bias.chunk(2, 0)
    f, i = torch.sigmoid(h @ wf.T + bf + 1), torch.sigmoid(h @ wi.T + bi - 1)
    return state * f + z * i


def ordinary_attention(attn, cfg, x: Tensor) -> Tensor:
    """x (n, e) normed -> (n, e): window attention, 1/sqrt(d) scaling."""
    n, (h, d), base = x.shape[0], (attn.heads, attn.dim_head), cfg.rotary_base
    q, k, v = (x @ attn.qkv.weight.T).view(n, 3, h, d).unbind(1)
    y = softmax_attention(rotate(q, base) * d ** -0.5, rotate(k, base), v,
                          window_mask(n, cfg.block_width, cfg.window))
    return y.reshape(n, h * d) @ attn.out.weight.T


def recurrent_attention(cell, cfg, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """x (n, e) normed tokens of the whole call, state (s, e) at the document's start.
    Returns the token output (n, e) and the state after the last complete block."""
    n, W, (h, d) = x.shape[0], cfg.block_width, (cfg.heads, cfg.dim_head)
    sc = cell.scales  # token self, token cross, state self, state cross
    k, v, q, q2 = (x @ cell.token_proj.weight.T).view(n, 4, h, d).unbind(1)
    k, q, q2 = unit(k), unit(q) * sc[0][:, None], unit(q2) * sc[1][:, None]
    # Vertical: tokens over the window (rotary on queries and keys of this attention only).
    self_out = softmax_attention(rotate(q, cfg.rotary_base), rotate(k, cfg.rotary_base), v,
                                 window_mask(n, W, cfg.window))
    cross_out = torch.empty_like(self_out)
    for t in range(0, -(-n // W)):
        blk = slice(t * W, min(n, (t + 1) * W))
        # State side: LN(s) + state ids -> K_s, V_s, Q_s (only with state self-attention), Q2_s.
        s_in = F.layer_norm(state, (cfg.dim,), cell.state_norm.weight, cell.state_norm.bias)
        s_in = s_in + cell.state_ids
        proj = (s_in @ cell.state_proj.weight.T).view(-1, 4 if cfg.state_self_attention else 3,
                                                       h, d).unbind(1)
        sk, sv, sq2 = proj[0], proj[1], proj[-1]
        sk = unit(sk)
        # Tokens of block t read the incoming state s_t.
        cross_out[blk] = softmax_attention(q2[blk], sk, sv)
        if (t + 1) * W > n:
            break  # a partial block does not advance the state
        # Horizontal: state self-attention and cross-attention to blocks t-1 and t.
        tokens = slice(max(0, (t - 1) * W), (t + 1) * W)
        b = softmax_attention(unit(sq2) * sc[3][:, None], k[tokens], v[tokens])
        if cfg.state_self_attention:
            a = softmax_attention(unit(proj[2]) * sc[2][:, None], sk, sv)
            hcat = torch.cat([a, b], dim=-1).reshape(-1, 2 * h * d)  # per head: [self, cross]
        else:
            hcat = b.reshape(-1, h * d)
        z = hcat @ cell.state_out.weight.T
        state = gate(cell.gate, state, z, hcat, cfg.gate, cfg.gate_write)
        if cfg.variant == "dual":
            y = F.layer_norm(state, (cfg.dim,), cell.mlp_norm.weight, cell.mlp_norm.bias)
            z = cell.state_mlp(y)
            state = gate(cell.mlp_gate, state, z, z, cfg.gate, cfg.gate_write)
    y = torch.cat([self_out.reshape(n, h * d), cross_out.reshape(n, h * d)], dim=-1)
    y = y @ cell.token_out.weight.T
    return y, state


@torch.no_grad()
def reference_forward(model, seq: Tensor) -> tuple[Tensor, Tensor]:
    """seq (b, n) from the documents' start -> logits (b, n, vocab), states (r, b, s, e)."""
    cfg = model.config
    if cfg.use_compressed_mem:
        raise NotImplementedError("the reference covers the cell without compressed memory")
    logits, states = [], []
    for row in seq:
        x, row_states = model.token_emb(row), []
        for layer in model.layers:
            xn = layer.attn_norm(x)
            if layer.recurrent:
                y, s = recurrent_attention(layer.attn, cfg, xn, layer.attn.initial_state)
                row_states.append(s)
            else:
                y = ordinary_attention(layer.attn, cfg, xn)
            x = x + y
            x = x + layer.mlp(layer.mlp_norm(x))
        logits.append(model.to_logits(model.norm(x)))
        states.append(torch.stack(row_states) if row_states else x.new_zeros(0, cfg.dim))
    return torch.stack(logits), torch.stack(states, dim=1)
