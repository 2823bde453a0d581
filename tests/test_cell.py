"""The recurrent cell against a naive reference written from the paper's equations, and the
initialisation that lets the state learn."""

import math

import pytest
import torch

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.cell import FixedGate, LSTMGate

from reference import reference_forward

VOCAB = 257


def perturbed(**kw) -> BlockRecurrentTransformer:
    """A tiny model whose parameters are moved off their initial values, so that no term of the
    cell (gate weights, LayerNorm biases, scales) can be wrong unnoticed."""
    model = BlockRecurrentTransformer(preset("tiny", **{"depth": 3, "recurrent_layers": (2,), **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kw", [
    dict(), dict(gate="lstm"), dict(variant="dual"), dict(gate="lstm", variant="dual"),
    dict(use_flash_attn=False), dict(recurrent_layers=(1, 3)), dict(recurrent_layers=()),
    dict(window="block"), dict(window="block", recurrent_layers=(), use_flash_attn=False),
], ids=["fixed-skip", "lstm-skip", "fixed-dual", "lstm-dual", "plain", "two-recurrent", "slide",
        "block-window", "block-window-slide-plain"])
@pytest.mark.parametrize("n", [16, 37, 80])
def test_model_equals_the_naive_reference(kw, n):
    """Logits and states equal a per-block implementation of the paper's equations (dense
    masked attention, absolute rotary positions, an explicit loop over blocks), for whole and
    partial last blocks."""
    model = perturbed(**kw)
    seq = torch.randint(0, VOCAB, (2, n))
    with torch.no_grad():
        logits, _, states = model(seq)
    ref_logits, ref_states = reference_forward(model, seq)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    if states.numel():
        torch.testing.assert_close(states, ref_states, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", ["sliding", "block"])
def test_reference_agrees_with_chunked_calls(window):
    """The reference also pins the cached path: chunks with carried memories give its logits."""
    model = perturbed(gate="lstm", window=window)
    seq = torch.randint(0, VOCAB, (1, 70))
    ref, _ = reference_forward(model, seq)
    mems = states = None
    outs = []
    with torch.no_grad():
        for a, b in ((0, 5), (5, 21), (21, 22), (22, 70)):
            logits, mems, states = model(seq[:, a:b], xl_memories=mems, states=states)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-5, rtol=1e-4)


def test_initialisation():
    model = BlockRecurrentTransformer(preset("small", gate="lstm", recurrent_layers=(2, 3)))
    cell = model.recurrent_cells[0]
    # Linear layers: std 1/sqrt(fan_in) (the official code's variance scaling).
    for lin in (cell.token_proj, cell.state_out, model.layers[0].attn.qkv, model.layers[0].mlp[2]):
        assert lin.weight.std().item() == pytest.approx(lin.weight.shape[1] ** -0.5, rel=0.05)
    assert model.token_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # The LSTM gate's kernel keeps its own small init (the generic loop must not overwrite it).
    proj = cell.gate.proj
    assert isinstance(cell.gate, LSTMGate)
    assert proj.weight.std().item() == pytest.approx(math.sqrt(0.1 / proj.weight.shape[1]), rel=0.05)
    assert 0.05 < proj.bias.std().item() < 0.2
    assert cell.state_ids.std().item() == pytest.approx(1.0, rel=0.05)
    assert cell.initial_state.std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.allclose(cell.scales, torch.full_like(cell.scales, 8.0))


def test_fixed_gate_starts_with_a_spread_of_retention():
    """sigmoid(b) covers timescales from 2 to 64 blocks: some channels keep what they hold."""
    model = BlockRecurrentTransformer(preset("small"))
    gates = [m for m in model.modules() if isinstance(m, FixedGate)]
    g = torch.sigmoid(gates[0].bias)
    assert g.min() >= 0.5 - 1e-6 and g.max() <= 63 / 64 + 1e-6
    assert (g > 0.9).float().mean() > 0.5 and (g < 0.75).any()
