"""What the synthetic tasks (the recall probe, MQAR) share: the target of positions where
nothing is asked, the training loop on fresh batches and the held-out accuracy loop."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import NonFiniteLossError

IGNORE = -100  # the target of positions without a question


def fit(model: nn.Module, next_batch: Callable[[int], tuple[Tensor, Tensor]], loss_of,
        opt: torch.optim.Optimizer, steps: int, sched=None,
        callback: Callable[[int, float], None] | None = None) -> list[float]:
    """`steps` optimizer steps, each on the fresh batch next_batch(step) -> (seq, targets), with
    the loss loss_of(model, seq, targets) -> every step's loss. NonFiniteLossError at the first
    non-finite loss. `callback(step, loss)` after every step."""
    model.train()
    losses = []
    for i in range(steps):
        seq, targets = next_batch(i)
        loss = loss_of(model, seq, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise NonFiniteLossError(f"non-finite training loss at step {i + 1}: lower the "
                                     "learning rate")
        if callback is not None:
            callback(i + 1, losses[-1])
    return losses


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
