"""train/optim.py: the learning-rate schedule, the loss over real tokens only, the autocast dtype
and which parameters AdamW decays."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockrecurrent.model.config import preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer
from blockrecurrent.train.optim import autocast_dtype, lm_loss_sum, lr_at, make_optimizer
from blockrecurrent.train.settings import TrainConfig


def test_lr_schedule():
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(1, tc) == pytest.approx(0.1) and lr_at(10, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.55) and lr_at(110, tc) == pytest.approx(0.1)


def test_loss_sums_the_real_tokens_only():
    logits, targets = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # row 1 ends in padding
    want = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    torch.testing.assert_close(lm_loss_sum(logits, targets, mask), want)
    padded = targets.masked_fill(~mask, 3)  # whatever the padding's targets hold
    assert torch.equal(lm_loss_sum(logits, padded, mask), lm_loss_sum(logits, targets, mask))
    assert lm_loss_sum(logits.bfloat16(), targets, mask).dtype == torch.float32


def test_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None  # float32 on CPU unless asked
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) == torch.bfloat16


def test_weight_decay_on_matrices_only():
    model = BlockRecurrentTransformer(preset("tiny"))
    opt = make_optimizer(model, lr=1e-3, betas=(0.8, 0.9), weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert opt.defaults["betas"] == (0.8, 0.9) and decayed["lr"] == 1e-3
    matrices = {id(m.weight) for m in model.modules()
                if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d))}
    assert {id(p) for p in decayed["params"]} == matrices
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert any(p is model.norm.weight for p in plain["params"])  # norms are not decayed
