"""model/attention.py: window attention against a dense reference, fused and plain paths,
causality, and the in-place growth of decoding caches. (WindowPlan's frame arithmetic:
test_plan.)"""

import pytest
import torch
from models import VOCAB, tiny

from blockrecurrent.model.attention import CacheStep, LayerCache, Rotary, append
from blockrecurrent.model.plan import WindowPlan


@pytest.mark.parametrize("window", ["sliding", "block"])
def test_window_attention_matches_a_dense_reference(window):
    """One ordinary layer equals dense attention with absolute rotary and the mask i-W < j <= i
    (sliding) or (i // W - 1) * W <= j <= i (block: the previous block and its own so far)."""
    model = tiny(depth=1, recurrent_layers=(), use_flash_attn=False, window=window)
    cfg, layer = model.config, model.layers[0]
    W, h, d = cfg.block_width, cfg.heads, cfg.dim_head
    seq = torch.randint(0, VOCAB, (2, 75))
    n = seq.shape[1]
    with torch.no_grad():
        logits, _, _ = model(seq)
        x = model.token_emb(seq)
        q, k, v = layer.attn.qkv(layer.attn_norm(x)).view(2, n, 3, h, d).unbind(2)
        rot = Rotary(d, n, cfg.rotary_base)  # absolute positions 0..n-1
        q, k = rot(q, 0), rot(k, 0)
        i = torch.arange(n)
        first = i - W + 1 if window == "sliding" else (i // W - 1) * W
        mask = (i[None, :] <= i[:, None]) & (i[None, :] >= first[:, None])
        att = ((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * d ** -0.5)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v.transpose(1, 2)).transpose(1, 2).reshape(2, n, h * d)
        x = x + layer.attn.out(y)
        x = x + layer.mlp(layer.mlp_norm(x))
        ref = model.to_logits(model.norm(x))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(use_compressed_mem=True), dict(gate="lstm")])
def test_flash_and_plain_paths_agree(kw):
    fused = tiny(use_flash_attn=True, **kw)
    plain = tiny(use_flash_attn=False, **kw)
    plain.load_state_dict(fused.state_dict())
    seq = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        a, _, sa = fused(seq)
        b, _, sb = plain(seq)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-4)


def test_causal():
    model = tiny(use_compressed_mem=True)
    seq = torch.randint(0, VOCAB, (1, 120))
    t = 61
    other = seq.clone()
    other[:, t:] = torch.randint(0, VOCAB, (1, 120 - t))
    with torch.no_grad():
        a, _, _ = model(seq)
        b, _, _ = model(other)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


# --- decoding caches grow in place --------------------------------------------------------------

def test_append_grows_only_the_last_view_in_place():
    b, h, d = 2, 3, 4
    new = lambda: torch.randn(b, 1, h, d)
    with torch.no_grad():
        c1, buf = append(None, None, new(), capacity=8)
        c2, buf2 = append(c1, buf, new(), capacity=8)
        assert buf2 is buf and c2.data_ptr() == c1.data_ptr()  # written in place
        before = c2.clone()
        c3, buf3 = append(c2, buf, new(), capacity=8)
        assert buf3 is buf and buf.last is c3 and torch.equal(c3[:, :2], before)
        # A second step from an older view (a branch) copies into a fresh buffer.
        branch, other = append(c2, buf, new(), capacity=8)
        assert other is not buf and torch.equal(c3[:, :2], before) and torch.equal(c2, before)
        assert not torch.equal(branch[:, 2], c3[:, 2])
        # A cache of another dtype, or one that is not the buffer's last view, is copied too.
        _, third = append(c3.double(), buf, new().double(), capacity=8)
        assert third is not buf
    # With autograd: plain concatenation, no buffer.
    grown, none = append(c3, buf, new(), capacity=8)
    assert none is None and grown.shape[1] == 4


def test_cache_step_grows_the_layer_cache():
    """A decoding step's window (CacheStep) appends the token after the cache and reads the
    window: the same output as plain attention over the last keys."""
    cfg = tiny().config
    W, h, d = cfg.block_width, cfg.heads, cfg.dim_head
    cache = LayerCache(torch.randn(1, 5, h, d), torch.randn(1, 5, h, d))
    q, k, v = (torch.randn(1, h, d) for _ in range(3))
    first = WindowPlan.step_start(cfg, 5)
    window = CacheStep(*cache[:2], None, None, first, 2 * W, flash=False)
    with torch.no_grad():
        out = window(q, k, v, d ** -0.5)
    nxt = window.next_cache()
    assert out.shape == (1, h * d) and isinstance(nxt, LayerCache)
    assert nxt.keys.shape[1] == 6 and nxt.compressed is None
    assert nxt.key_buffer.last is nxt.keys and nxt.key_buffer.capacity == 2 * W
    assert torch.equal(nxt.keys[:, :5], cache.keys)
    assert torch.equal(nxt.values[:, 5:], v[:, None])
    keys, values = nxt.keys[:, first:].transpose(1, 2), nxt.values[:, first:].transpose(1, 2)
    want = ((q[:, :, None] @ keys.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ values
    torch.testing.assert_close(out, want.reshape(1, h * d))
