"""Model FLOP counts of the benchmark (bench_machine): by hand and against torch's counter."""
import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blockrecurrent import BlockRecurrentTransformer, preset
from blockrecurrent.bench import machine as B
from blockrecurrent.model.config import BlockRecurrentConfig


def tiny(**kw):
    # Two blocks per segment so that the recurrent state advances inside a segment.
    return preset("tiny", dim=32, heads=2, dim_head=16, max_seq_len=32, block_width=16,
                  num_state_vectors=8, **kw)


# ------------------------------------------------------------------------------- FLOP counter


def test_flops_hand_count_plain_layer():
    # E=4, one head of width 2, W=2, GELU MLP 8, vocabulary 10; per token:
    # qkv 2*4*6=48, attention 4*(2W=4)*2=32, out 2*2*4=16, MLP 4*4*8=128, logits 2*4*10=80.
    cfg = BlockRecurrentConfig(num_tokens=10, dim=4, depth=1, heads=1, dim_head=2,
                                 block_width=2, max_seq_len=2, num_state_vectors=1,
                                 recurrent_layers=(), mlp_mult=2.0, mlp="gelu")
    assert B.flops_per_token(cfg) == 48 + 32 + 16 + 128 + 80
    assert B.flops_per_token(cfg, training=True) == 3 * 304


def test_flops_hand_count_recurrent_layer():
    # Same sizes, the one layer recurrent with S=1. Token side: projections 2*4*8=64,
    # window attention 32, cross-attention to S=1 state keys 4*1*2=8, output 2*4*4=32, MLP 128.
    # State side per block: projections 64, S x S 8, S x 2W 32, output 32 = 136, over W=2 tokens
    # (the paper's cell, with state self-attention; without it 48 + 32 + 16 = 96).
    cfg = BlockRecurrentConfig(num_tokens=10, dim=4, depth=1, heads=1, dim_head=2,
                                 block_width=2, max_seq_len=2, num_state_vectors=1,
                                 recurrent_layers=(1,), mlp_mult=2.0, mlp="gelu",
                                 state_self_attention=True)
    assert B.flops_per_token(cfg) == 64 + 32 + 8 + 32 + 128 + 136 / 2 + 80
    # A partial block does not advance the state: 3 tokens = 3 token-side counts + 1 state step.
    assert B.count_flops(cfg, 3) == 3 * (64 + 32 + 8 + 32 + 128 + 80) + 136
    cross_only = dataclasses.replace(cfg, state_self_attention=False)
    assert B.flops_per_token(cross_only) == 64 + 32 + 8 + 32 + 128 + 96 / 2 + 80


@pytest.mark.parametrize("kw", [{}, dict(recurrent_layers=()), dict(gate="lstm", variant="dual"),
                                dict(mlp="gelu", variant="dual")])
def test_flops_linear_in_length(kw):
    cfg = tiny(**kw)
    per_token = [B.count_flops(cfg, n) / n for n in (16, 64, 1024, 65536)]
    assert per_token == pytest.approx([B.flops_per_token(cfg)] * 4, rel=1e-12)
    assert B.count_flops(cfg, 64, training=True) == 3 * B.count_flops(cfg, 64)


@pytest.mark.parametrize("kw", [{}, dict(recurrent_layers=()), dict(gate="lstm", variant="dual"),
                                dict(mlp="gelu", variant="dual"),
                                dict(gate="lstm", state_self_attention=True)])
def test_flops_match_torch_flop_counter(kw):
    # The plain attention path runs every matmul the analytic count assumes, no more: torch's
    # own counter must agree exactly on a steady-state segment (memories carried in).
    cfg = tiny(use_flash_attn=False, **kw)
    model = BlockRecurrentTransformer(cfg).eval()
    x = torch.randint(0, cfg.num_tokens, (2, 32))
    with torch.no_grad():
        _, mems, states = model(x)
        with FlopCounterMode(display=False) as counter:
            model(x, xl_memories=mems, states=states)
    assert counter.get_total_flops() == 2 * B.count_flops(cfg, 32)
