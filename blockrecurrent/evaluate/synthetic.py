"""What the synthetic tasks (the recall probe, MQAR) share: the target of positions where
nothing is asked, and the held-out accuracy loop."""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100  # the target of positions without a question


@torch.no_grad()
def held_out_accuracy(model: nn.Module, task, logits_at, *, num_sequences: int, seed: int,
                      batch_size: int) -> float:
    """Fraction of the answers of `num_sequences` held-out sequences of a synthetic task (its
    `batch(size, generator)` gives (seq, targets), IGNORE where nothing is asked) whose target
    is the argmax of logits_at(model, seq, mask) (the logits at the asked positions)."""
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    right = total = 0
    for start in range(0, num_sequences, batch_size):
        seq, targets = task.batch(min(batch_size, num_sequences - start), g)
        mask = targets != IGNORE
        right += int((logits_at(model, seq, mask).argmax(-1) == targets[mask]).sum())
        total += int(mask.sum())
    model.train(was_training)
    return right / total
