"""The recurrent cell against a naive reference written from the paper's equations, and the
initialisation that lets the state learn."""

import math

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, run_chunks, tiny
from reference import reference_forward

from blockrecurrent.model.cell import STATE_READ, FixedGate, LSTMGate
from blockrecurrent.model.config import preset
from blockrecurrent.model.transformer import (
    CANDIDATE_GAIN,
    STATE_READ_GAIN,
    BlockRecurrentTransformer,
)


def perturbed(**kw) -> BlockRecurrentTransformer:
    """A tiny model whose parameters are moved off their initial values, so that no term of the
    cell (gate weights, LayerNorm biases, scales) can be wrong unnoticed."""
    cfg = preset("tiny", **{"depth": 3, "recurrent_layers": (2,), **kw})
    model = BlockRecurrentTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kw", [
    dict(), dict(gate="lstm"), dict(variant="dual"), dict(gate="lstm", variant="dual"),
    dict(use_flash_attn=False), dict(recurrent_layers=(1, 3)), dict(recurrent_layers=()),
    dict(window="block"), dict(window="block", recurrent_layers=(), use_flash_attn=False),
    dict(state_self_attention=True), dict(state_self_attention=False, gate="lstm"),
    dict(gate_write="normalized"), dict(gate_write="normalized", variant="dual"),
], ids=["fixed-skip", "lstm-skip", "fixed-dual", "lstm-dual", "plain", "two-recurrent", "slide",
        "block-window", "block-window-slide-plain", "state-self", "lstm-state-cross-only",
        "normalized-write", "normalized-write-dual"])
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


@pytest.mark.parametrize("kw", [dict(), dict(gate="lstm", variant="dual"), dict(window="block"),
                                dict(recurrent_layers=(), use_flash_attn=False),
                                dict(state_self_attention=True),
                                dict(state_self_attention=False), dict(gate_write="normalized")],
                         ids=["fixed-skip", "lstm-dual", "block-window", "slide-plain",
                              "state-self", "state-cross-only", "normalized-write"])
def test_gradients_equal_the_naive_reference(kw):
    """Training follows the paper's equations too: every parameter's gradient of a loss over
    several blocks in one call (the banded windows' backward, the state loop's) equals the
    gradient through the per-block reference. In float64: the sharp attention of the state's
    read (STATE_READ_GAIN) amplifies float32 rounding in gradients past any useful tolerance;
    what is left in float64 (~1e-7, from rotary tables kept in float32) is far below a real
    error."""
    assert_gradients_match_the_reference(perturbed(**kw).double().train())


def test_gradients_equal_the_naive_reference_in_float32():
    """The float32 path (the training dtype) too, with the state's read at unit spread, where
    float32 rounding stays within the tolerance."""
    model = perturbed().train()
    with torch.no_grad():
        for cell in model.recurrent_cells:
            cell.scales[STATE_READ].div_(STATE_READ_GAIN)
    assert_gradients_match_the_reference(model)


def assert_gradients_match_the_reference(model):
    seq = torch.randint(0, VOCAB, (2, 80))
    params = list(model.parameters())

    def grads(logits):
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), seq[:, 1:].flatten())
        return torch.autograd.grad(loss, params, allow_unused=True)

    got = grads(model(seq)[0])
    want = grads(reference_forward.__wrapped__(model, seq)[0])  # without its no_grad
    for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


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
    for lin in (cell.token_proj, model.layers[0].attn.qkv, model.layers[0].mlp[2]):
        assert lin.weight.std().item() == pytest.approx(lin.weight.shape[1] ** -0.5, rel=0.05)
    # The state's candidate starts CANDIDATE_GAIN times larger (slow channels must be heard).
    want = CANDIDATE_GAIN * cell.state_out.weight.shape[1] ** -0.5
    assert cell.state_out.weight.std().item() == pytest.approx(want, rel=0.05)
    assert model.token_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # The LSTM gate's kernel keeps its own small init (the generic loop must not overwrite it).
    proj = cell.gate.proj
    assert isinstance(cell.gate, LSTMGate)
    want = math.sqrt(0.1 / proj.weight.shape[1])
    assert proj.weight.std().item() == pytest.approx(want, rel=0.05)
    assert 0.05 < proj.bias.std().item() < 0.2
    assert cell.state_ids.std().item() == pytest.approx(1.0, rel=0.05)
    assert cell.initial_state.std().item() == pytest.approx(0.1, rel=0.05)
    # Attention scales start at sqrt(dim_head) = 8 (unit-spread scores), the state's read of the
    # tokens (row STATE_READ) STATE_READ_GAIN times sharper.
    want = torch.tensor([8.0, 8.0, 8.0, 8.0 * STATE_READ_GAIN])[:, None].expand_as(cell.scales)
    torch.testing.assert_close(cell.scales.detach(), want)


def test_fixed_gate_starts_with_a_spread_of_retention():
    """sigmoid(b) covers timescales from 2 to 64 blocks: some channels keep what they hold."""
    model = BlockRecurrentTransformer(preset("small"))
    gates = [m for m in model.modules() if isinstance(m, FixedGate)]
    g = torch.sigmoid(gates[0].bias)
    assert g.min() >= 0.5 - 1e-6 and g.max() <= 63 / 64 + 1e-6
    assert (g > 0.9).float().mean() > 0.5 and (g < 0.75).any()


# --- the state across blocks ----------------------------------------------------------------------

@pytest.mark.parametrize("write", ["convex", "normalized"])
def test_fixed_gate_write_sets_what_each_channel_holds(write):
    """Fed independent unit-spread candidates block after block, a channel with retention g
    settles at a spread of sqrt((1 - g) / (1 + g)) with the paper's convex write (1/8 for the
    slow channels that carry far) and at 1 in every channel with the normalized write."""
    torch.manual_seed(0)
    gate = FixedGate(preset("tiny", gate_write=write), input_dim=0)
    with torch.no_grad():
        gate.bias.copy_(torch.linspace(-1.0, 4.0, gate.bias.numel()))
    g = torch.sigmoid(gate.bias).detach()
    state, held = torch.zeros(4096, g.numel()), []
    with torch.no_grad():
        for step in range(300):
            state = gate(state, torch.randn_like(state), None)
            if step >= 200:
                held.append(state.std(dim=0))
    spread = torch.stack(held).mean(0)
    want = torch.ones_like(g) if write == "normalized" else ((1 - g) / (1 + g)).sqrt()
    torch.testing.assert_close(spread, want, rtol=0.05, atol=0.0)


def test_normalized_write_has_finite_gradients_for_saturated_gates():
    """sqrt(1 - g^2) is computed as sqrt(sigmoid(-b) (1 + g)): gate biases far beyond where
    1 - sigmoid(b) rounds to 0 in float32 (b ~ 17) still give finite values and gradients."""
    gate = FixedGate(preset("tiny", gate_write="normalized"), input_dim=0)
    with torch.no_grad():
        gate.bias.copy_(torch.linspace(-80.0, 80.0, gate.bias.numel()))
    out = gate(torch.randn(2, 3, gate.bias.numel()), torch.randn(2, 3, gate.bias.numel()), None)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(gate.bias.grad).all()


def test_information_passes_through_the_state_beyond_the_window():
    """Changing block 0 changes logits many windows later only when there is recurrence."""
    for recurrent, expect_change in (((2,), True), ((), False)):
        model = tiny(recurrent_layers=recurrent)
        W, depth = model.config.block_width, model.config.depth
        seq = torch.randint(0, VOCAB, (1, 10 * W))
        other = seq.clone()
        other[:, :W] = torch.randint(0, VOCAB, (1, W))
        far = (depth + 2) * W  # beyond the receptive field of depth windows
        with torch.no_grad():
            a = run_chunks(model, seq, [2 * W] * 5)[0]
            b = run_chunks(model, other, [2 * W] * 5)[0]
        changed = (a[:, far:] - b[:, far:]).abs().max().item()
        assert (changed > 1e-4) == expect_change, (recurrent, changed)


def test_gradients_reach_the_state_parameters():
    for gate, variant in (("fixed", "skip"), ("lstm", "dual")):
        model = tiny(gate=gate, variant=variant).train()
        seq = torch.randint(0, VOCAB, (2, 4 * model.config.block_width))
        logits, _, _ = model(seq)
        F.cross_entropy(logits.flatten(0, 1), seq.flatten()).backward()
        cell = model.recurrent_cells[0]
        names = ["initial_state", "state_ids", "state_proj.weight", "state_out.weight", "scales"]
        names += ["gate.bias"] if gate == "fixed" else ["gate.proj.weight", "mlp_gate.proj.weight",
                                                        "state_mlp.0.weight"]
        params = dict(cell.named_parameters())
        for name in names:
            g = params[name].grad
            assert g is not None and g.abs().sum() > 0, (gate, name)


def test_gradient_flows_through_the_state_across_blocks():
    """Within one call, a loss on the last block reaches the tokens of the first block."""
    model = tiny().train()
    W = model.config.block_width
    seq = torch.randint(0, VOCAB, (1, 8 * W))
    emb = model.token_emb.weight
    logits, _, _ = model(seq)
    logits[:, -1].sum().backward()
    first = seq[0, :W].unique()
    late = seq[0, 4 * W:].unique()
    only_first = first[~torch.isin(first, late)]
    assert len(only_first) and emb.grad[only_first].abs().sum() > 0


@pytest.mark.parametrize("self_attention", [False, True])
def test_state_slots_mix_only_through_state_self_attention(self_attention):
    """Without state self-attention a slot's update reads the tokens and its own content only, so
    changing one slot leaves every other slot's next state as it was; with it, all slots move."""
    model = perturbed(state_self_attention=self_attention)
    W = model.config.block_width
    seq = torch.randint(0, VOCAB, (1, 2 * W))
    with torch.no_grad():
        _, mems, states = model(seq[:, :W])
        _, _, a = model(seq[:, W:], xl_memories=mems, states=states)
        moved = states.clone()
        moved[:, :, 0] += torch.randn_like(moved[:, :, 0])
        _, _, b = model(seq[:, W:], xl_memories=mems, states=moved)
    others = (a[:, :, 1:] - b[:, :, 1:]).abs().max().item()
    assert (others > 1e-4) == self_attention, others
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-4
