"""The one streaming loop of evaluation: whole documents read segment by segment through
data.DocumentLanes, exactly as in training (each batch row reads one document, `reset` marks a
row that starts a new one), with the XL memories and the recurrent states carried from segment
to segment. The trainer's periodic evaluation (Trainer.evaluate) and evaluate.evaluation.evaluate
both run it; each sums what it needs from the logits of every segment (`on_segment`).

It lives in train/, below evaluate/, so that the trainer can use it without importing evaluate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..data.lanes import DocumentLanes
from .optim import lm_loss_sum

# What the recurrent states do from one segment to the next (see stream_segments).
RESET_STATE = ("carry", "every-segment", "other-document")


@torch.no_grad()
def stream_segments(model, lanes: DocumentLanes | None,
                    on_segment: Callable[[dict, Tensor], None], *, device: torch.device,
                    autocast: torch.dtype | None = None, reset_state: str = "carry",
                    lockstep: Callable[[bool], bool] | None = None, pad_token: int = 0) -> None:
    """Run `model` over every segment of `lanes` (loop=False) and call on_segment(batch, logits)
    for each: batch as the lanes give it (on the CPU), logits on `device`.

    lanes: None where this process has no documents (with lockstep, it still runs padding).
    autocast: the dtype to autocast to; None or float32: none.
    reset_state: "carry" carries the states as in training; "every-segment" starts every segment
    from the learned initial state (the block caches still carry the window across segments);
    "other-document" gives every row, at every segment, the state that the previous row's
    document reached (a state of the usual kind that holds nothing about this document).
    lockstep: for FSDP, where every forward gathers the weights from all processes: given
    whether this process has a segment left, whether any has (an all-reduce). A process whose
    documents are done then runs forwards on one row of pad_token (not passed to on_segment)
    until every process is done.
    The model is in eval mode meanwhile, and back in its own mode after."""
    if reset_state not in RESET_STATE:
        raise ValueError(f"reset_state must be one of {RESET_STATE}, got {reset_state!r}")
    context = torch.autocast(device.type, dtype=autocast or torch.float32,
                             enabled=autocast not in (None, torch.float32))
    was_training = model.training
    model.eval()
    mems = states = None
    try:
        while True:
            more = lanes is not None and not lanes.exhausted
            if not (lockstep(more) if lockstep is not None else more):
                break
            if more:
                batch = lanes.next_batch()
                inputs, reset = batch["inputs"].to(device), batch["reset"].to(device)
            else:  # lockstep, this process's documents done: a forward on padding
                inputs = torch.full((1, model.config.max_seq_len), pad_token, device=device)
                reset = mems = states = None
            if reset_state == "every-segment":
                states = None  # the learned initial state; the caches still carry the window
            elif reset_state == "other-document" and states is not None:
                states = states.roll(1, dims=1)  # (r, b, s, e): row k gets row k-1's state
            with context:
                logits, mems, states = model(inputs, xl_memories=mems, states=states, reset=reset)
            if more:
                on_segment(batch, logits)
    finally:
        model.train(was_training)


def stream_loss(model, corpus, batch_size: int, env, reset_state: str = "carry", *,
                autocast: torch.dtype | None = None, lockstep: bool = False
                ) -> tuple[float, float]:
    """(nats, tokens) of every document of `corpus` read whole through stream_segments, the
    documents shared out over env's processes (at most batch_size rows each) and the sums
    all-reduced. lockstep: FSDP (see stream_segments)."""
    n = len(corpus)
    sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # nats, tokens
    world = min(env.world_size, n)  # processes beyond the number of documents add zeros
    lanes = None if env.rank >= world else DocumentLanes(
        corpus, max(1, min(batch_size, n // world)), model.config.max_seq_len,
        rank=env.rank, world_size=world, shuffle=False, loop=False)

    def add(batch: dict, logits: Tensor) -> None:
        mask = batch["loss_mask"].to(env.device)
        sums[0] += lm_loss_sum(logits, batch["targets"].to(env.device), mask).double()
        sums[1] += mask.sum()

    stream_segments(model, lanes, add, device=env.device, autocast=autocast,
                    reset_state=reset_state, lockstep=env.any_rank if lockstep else None,
                    pad_token=corpus.bos_id)
    nats, tokens = env.all_reduce(sums).tolist()
    return nats, tokens
