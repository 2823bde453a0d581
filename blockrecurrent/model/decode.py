"""The single-token decoding step, written for speed (`BlockRecurrentTransformer.forward` takes it
for every call that `WindowPlan.single` would mark: one token that completes no block, in
documents that started at or before the cache, without autograd and compressed memory).

Axis letters: b batch, e model width, h heads, d head width, l cached tokens, s state slots.

The general path builds a WindowPlan, runs every layer through nn.Module calls and handles
(b, n, ...) tensors for any n; for one token most of its time goes to that machinery, not to the
arithmetic (one matrix-vector product per weight matrix, memory-bound). This step computes the
same functions on (b, e) rows with the fewest torch calls: functional ops on the modules'
weights, residual additions fused into the projections (addmm), the rotary row of the step's
position looked up once for all layers, q, k (and the recurrent cell's second query) normalised
by one call, the cache grown in place by `attention.append` as before (memories handed out keep
their values). It reads the modules' parameters at every call, so it always uses the current
weights; the model's `to_logits` is still called as a module (its hooks run). The general path
is the reference: tests/test_generation.py checks cached decoding against a full forward, and
tests/test_decode.py checks this step against the general path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import GrowthBuffer, Rotary, WindowPlan, append
from .cell import TOKEN_CROSS, TOKEN_SELF, activation_kind, mlp_activation

if TYPE_CHECKING:  # model imports this module
    from .transformer import BlockRecurrentTransformer, ModelOutput, XLMemories

# Set while generation's decoder runs a step on its own outputs: the memories and states it passes
# are exactly what the model returned for the last step, and the token was sampled from the
# vocabulary, so the per-call checks cannot fail and the cached state keys/values belong to the
# state when it is the same tensor (compared by storage, not by value: torch.equal of the state
# costs ~30 us at batch 1 and ~1.5 ms at batch 32 on a 2-core CPU).
_OWN_OUTPUTS = contextvars.ContextVar("blockrecurrent_own_outputs", default=False)


@contextlib.contextmanager
def own_outputs():
    """For generation's decoding loop only: the model is called on its own last outputs."""
    token = _OWN_OUTPUTS.set(True)
    try:
        yield
    finally:
        _OWN_OUTPUTS.reset(token)


def trusted() -> bool:
    return _OWN_OUTPUTS.get()


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """a and b view the same memory the same way (so hold the same values)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def eligible(model, seq: Tensor, mems, reset) -> bool:
    """Whether the call model(seq, mems, states, reset) is a decoding step this module computes
    (everything else takes the general path)."""
    cfg = model.config
    if (mems is None or reset is not None or torch.is_grad_enabled()
            or (model.training and cfg.dropout > 0) or torch.is_autocast_enabled(seq.device.type)):
        return False
    L = mems.cache_len
    # Every row's document started at or before the cache (WindowPlan.all_valid). A fast
    # step's own memories keep that (lengths and cache grow together): no comparison then.
    all_valid = (trusted() and mems.all_valid) or (
        seq.shape[1] == 1 and bool((mems.lengths >= L).all()))
    return WindowPlan.is_step(cfg, L, seq.shape[1], all_valid)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, flash: bool) -> Tensor:
    """q (b, h, 1, d), k/v (b, h, j, d) -> (b, h, 1, d); attention.attend without a mask."""
    if flash:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1) @ v


def step(model: BlockRecurrentTransformer, seq: Tensor, mems: XLMemories,
         states: Tensor) -> ModelOutput:
    """One decoding step, for a call that `eligible` accepts: the same outputs as the general
    path (a ModelOutput: logits (b, 1, v), the next XLMemories, states (r, b, s, e)).
    One function of ~85 lines on purpose: the per-layer body runs for every layer of every token,
    and a helper per layer would add a Python call each time (see the module docstring)."""
    from .transformer import ModelOutput, XLMemories  # model imports this module

    if model._compiled_decode is not None:
        return model._compiled_decode(seq, mems, states)
    cfg = model.config
    b = seq.shape[0]
    L, W = mems.cache_len, cfg.block_width
    h, d = cfg.heads, cfg.dim_head
    hd = h * d
    first = WindowPlan.step_start(cfg, L)  # the first key the token reads
    x = F.embedding(seq[:, 0], model.token_emb.weight)  # (b, e)
    e, dt = x.shape[-1:], x.dtype
    ln, linear, addmm = torch.layer_norm, F.linear, torch.addmm  # no Python wrappers
    rotary = None
    keys, values, state_keys, state_values = [], [], [], []
    key_bufs, value_bufs = mems.key_buffers, mems.value_buffers
    key_bufs_out, value_bufs_out = [], []
    r = 0
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        if rotary is None:  # every layer's table is the same function of the position
            attn.rotary._fit(L + 1)
            rotary = attn.rotary
            cos, sin = rotary.cos[L], rotary.sin[L]
            if cos.dtype != dt:
                cos, sin = cos.to(dt), sin.to(dt)
        n1 = layer.attn_norm
        xn = ln(x, e, n1.weight, n1.bias, n1.eps)
        if layer.recurrent:
            # k, v, q, q2 in one product; k, q, q2 unit vectors (v normalised too, unused);
            # F.normalize's arithmetic without its wrapper.
            kvqq = linear(xn, attn.token_proj.weight).view(b, 4, h, d)
            unit = kvqq / kvqq.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            kq = Rotary._rotate(unit[:, 0:3:2], cos, sin)  # (b, 2, h, d): rotated k and q
            scales = attn.scales if attn.scales.dtype == dt else attn.scales.to(dt)
            k, q = kq[:, 0], kq[:, 1] * scales[TOKEN_SELF][:, None]
            q2 = unit[:, 3] * scales[TOKEN_CROSS][:, None]
            v = kvqq[:, 1]
            scale = 1.0
        else:
            qkv = linear(xn, attn.qkv.weight).view(b, 3, h, d)
            qk = Rotary._rotate(qkv[:, :2], cos, sin)
            q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
            scale = d ** -0.5
        ck, kbuf = append(mems.keys[i], key_bufs[i] if key_bufs else None, k[:, None], 2 * W)
        cv, vbuf = append(mems.values[i], value_bufs[i] if value_bufs else None, v[:, None],
                          2 * W)  # (b, l+1, h, d) each
        keys.append(ck)
        values.append(cv)
        key_bufs_out.append(kbuf)
        value_bufs_out.append(vbuf)
        y = _attend(q[:, :, None], ck[:, first:].transpose(1, 2), cv[:, first:].transpose(1, 2),
                    scale, attn.flash).view(b, hd)
        if layer.recurrent:
            state = states[r]
            kv = model._cached_state_kv(mems, r, state)
            if kv is None:
                kv = attn.state_keys_values(state)
            state_keys.append(kv[0])
            state_values.append(kv[1])
            cross = _attend(q2[:, :, None], kv[0].transpose(1, 2), kv[1].transpose(1, 2), 1.0,
                            attn.flash).view(b, hd)
            x = addmm(x, torch.cat([y, cross], dim=-1), attn.token_out.weight.t())
            r += 1
        else:
            x = addmm(x, y, attn.out.weight.t())
        n2, mlp = layer.mlp_norm, layer.mlp
        hid = linear(ln(x, e, n2.weight, n2.bias, n2.eps), mlp[0].weight)  # no biases (cell.mlp)
        x = addmm(x, mlp_activation(hid, *activation_kind(mlp[1])), mlp[2].weight.t())
    norm = model.norm
    x = ln(x, e, norm.weight, norm.bias, norm.eps)
    logits = model.to_logits(x[:, None])  # a module call: hooks on it still see every step
    keep = r > 0
    new_mems = XLMemories(
        keys=tuple(keys), values=tuple(values), lengths=mems.lengths + 1,
        state_keys=tuple(state_keys) if keep else None,
        state_values=tuple(state_values) if keep else None,
        state_source=tuple(states.unbind(0)) if keep else None,
        key_buffers=tuple(key_bufs_out), value_buffers=tuple(value_bufs_out),
        all_valid=True)  # see eligible
    return ModelOutput(logits, new_mems, states)


# --- compiled step over fixed-size buffers -------------------------------------------------


def _static_buffer(cache: Tensor, buffer: GrowthBuffer | None, dtype: torch.dtype,
                   capacity: int) -> GrowthBuffer:
    """A buffer (b, capacity, h, d) whose first L positions hold `cache` (b, L, h, d) and whose
    position L may be written: `buffer` when `cache` is the longest view yet taken of it and it
    has been zero-filled beyond its views (so masked positions hold finite numbers: attention
    multiplies them by 0), else a fresh zero-filled copy (the first compiled step after a
    prefill or a branch)."""
    L = cache.shape[1]
    if (buffer is None or not buffer.extends(cache, dtype) or buffer.capacity != capacity
            or not buffer.finite):
        buffer = GrowthBuffer(cache.new_zeros(cache.shape[0], capacity, *cache.shape[2:],
                                              dtype=dtype), finite=True)
        buffer.data[:, :L] = cache
    return buffer


def _layout(model) -> tuple:
    """The static facts the compiled step is specialised on."""
    cfg = model.config
    return (cfg.block_width, cfg.heads, cfg.dim_head, cfg.window == "sliding",
            tuple(layer.recurrent for layer in model.layers),
            tuple(activation_kind(layer.mlp[1]) for layer in model.layers),
            tuple(n.eps for layer in model.layers for n in (layer.attn_norm, layer.mlp_norm)),
            model.norm.eps)


def _weights(model) -> list:
    """The parameters the step reads, in `_core`'s order (read at every call: always current)."""
    out = [model.token_emb.weight]
    for layer in model.layers:
        a = layer.attn
        out += [layer.attn_norm.weight, layer.attn_norm.bias]
        if layer.recurrent:
            out += [a.token_proj.weight, a.scales, a.token_out.weight]
        else:
            out += [a.qkv.weight, a.out.weight]
        out += [layer.mlp_norm.weight, layer.mlp_norm.bias, layer.mlp[0].weight,
                layer.mlp[2].weight]
    return out + [model.norm.weight, model.norm.bias]


def _core(layout, tok, pos, cos, sin, kbufs, vbufs, skeys, svals, weights):
    """The step's arithmetic over (b, 2W, h, d) buffers; returns the final normed x (b, e)."""
    W, h, d, sliding, recurrent, acts, eps, norm_eps = layout
    b, hd = tok.shape[0], h * d
    j = torch.arange(2 * W, device=tok.device)
    valid = (j <= pos) & (j > pos - W) if sliding else j <= pos  # (2W,)
    at = pos.view(1)
    mask = valid.view(1, 1, 1, 2 * W)
    w = iter(weights)
    x = F.embedding(tok, next(w))
    e = x.shape[-1]
    dt = x.dtype

    def attend(q, kb, vb, scale, mask):  # q (b, h, d), kb/vb (b, j, h, d) -> (b, h, d)
        return F.scaled_dot_product_attention(q[:, :, None], kb.transpose(1, 2),
                                              vb.transpose(1, 2), attn_mask=mask,
                                              scale=scale)[:, :, 0]

    r = 0
    for i, rec in enumerate(recurrent):
        nw, nb = next(w), next(w)
        xn = F.layer_norm(x, (e,), nw, nb, eps[2 * i])
        if rec:
            proj, scales, out = next(w), next(w), next(w)
            kvqq = F.linear(xn, proj).view(b, 4, h, d)
            unit = F.normalize(kvqq, dim=-1)
            kq = Rotary._rotate(unit[:, 0:3:2], cos, sin)
            k, q = kq[:, 0], kq[:, 1] * scales[TOKEN_SELF][:, None].to(dt)
            q2 = unit[:, 3] * scales[TOKEN_CROSS][:, None].to(dt)
            v, scale = kvqq[:, 1], 1.0
        else:
            qkv_w, out = next(w), next(w)
            qkv = F.linear(xn, qkv_w).view(b, 3, h, d)
            qk = Rotary._rotate(qkv[:, :2], cos, sin)
            q, k, v, scale = qk[:, 0], qk[:, 1], qkv[:, 2], d ** -0.5
        kb, vb = kbufs[i], vbufs[i]
        kb.index_copy_(1, at, k[:, None])
        vb.index_copy_(1, at, v[:, None])
        y = attend(q, kb, vb, scale, mask).reshape(b, hd)
        if rec:
            cross = attend(q2, skeys[r], svals[r], 1.0, None).reshape(b, hd)
            y = torch.cat([y, cross], dim=-1)
            r += 1
        x = torch.addmm(x, y, out.t())
        nw, nb, up, down = next(w), next(w), next(w), next(w)
        hid = mlp_activation(F.linear(F.layer_norm(x, (e,), nw, nb, eps[2 * i + 1]), up),
                             *acts[i])
        x = torch.addmm(x, hid, down.t())
    return F.layer_norm(x, (e,), next(w), next(w), norm_eps)


class CompiledStep:
    """The arithmetic of `step` as one torch.compile graph with static shapes: every layer's
    cache is a (b, 2W, h, d) buffer written at the step's position, attention reads all 2W
    positions under a validity mask built from the position, so that one graph (per batch
    size and dtype) serves every step. Python around it keeps `append`'s rules, so memories
    handed out keep their values. Opt-in (`model.compile_decode()`): the first step of each
    batch size compiles for tens of seconds, and masking reads 2W keys where the eager step
    reads the window only."""

    def __init__(self, model, **compile_kwargs):
        self.model = model
        # A function of tensors only (weights passed in): dynamo then guards on the inputs,
        # not on the module tree, whose guards cost more per call than the arithmetic.
        self.fn = torch.compile(functools.partial(_core, _layout(model)), fullgraph=True,
                                dynamic=False, **compile_kwargs)
        self._positions: dict = {}

    def __call__(self, seq: Tensor, mems: XLMemories, states: Tensor) -> ModelOutput:
        from .transformer import ModelOutput, XLMemories

        model = self.model
        cfg = model.config
        L, W = mems.cache_len, cfg.block_width
        dtype = model.token_emb.weight.dtype
        rotary = next(layer.attn.rotary for layer in model.layers)
        rotary._fit(L + 1)
        cos, sin = rotary.cos[L].to(dtype), rotary.sin[L].to(dtype)
        pos = self._positions.get(L)
        if pos is None or pos.device != seq.device:
            pos = self._positions[L] = torch.tensor(L, device=seq.device)
        depth = len(mems.keys)
        no_bufs = (None,) * depth
        kbufs = [_static_buffer(c, buf, dtype, 2 * W) for c, buf in
                 zip(mems.keys, mems.key_buffers or no_bufs, strict=True)]
        vbufs = [_static_buffer(c, buf, dtype, 2 * W) for c, buf in
                 zip(mems.values, mems.value_buffers or no_bufs, strict=True)]
        skeys, svals = [], []
        for r, cell in enumerate(model.recurrent_cells):
            kv = model._cached_state_kv(mems, r, states[r])
            if kv is None:
                kv = cell.state_keys_values(states[r])
            skeys.append(kv[0])
            svals.append(kv[1])
        x = self.fn(seq[:, 0], pos, cos, sin, [buf.data for buf in kbufs],
                    [buf.data for buf in vbufs], skeys, svals, _weights(model))
        logits = model.to_logits(x[:, None])
        keep = bool(skeys)
        new_mems = XLMemories(
            keys=tuple(buf.hand_out(L + 1) for buf in kbufs),
            values=tuple(buf.hand_out(L + 1) for buf in vbufs), lengths=mems.lengths + 1,
            state_keys=tuple(skeys) if keep else None, state_values=tuple(svals) if keep else None,
            state_source=tuple(states.unbind(0)) if keep else None,
            key_buffers=tuple(kbufs), value_buffers=tuple(vbufs),
            all_valid=True)  # see eligible
        return ModelOutput(logits, new_mems, states)
