"""Decoding many requests at once: each request is a `Row` (its own memories, states, sampling
settings and random stream); `step_together` feeds every row's last sampled token in one model
call per group of rows whose caches line up (the same cache length, so the same position in
their blocks: XLMemories.cat), and `Scheduler` runs the loop on one thread: new requests are
prefilled alone, then join the running batch at their next token.

A step's cost does not grow with the length of a row's document: each row carries < 2W cached
tokens per layer and its state.
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..generate.generation import prefill
from ..generate.sampling import sample_next
from ..model.memories import XLMemories

__all__ = ["Job", "Row", "Scheduler", "step_together"]


@dataclass
class Row:
    """One document being decoded: the next token's logits (1, v) after what it has read."""
    logits: Tensor | None
    mems: XLMemories | None
    states: Tensor | None
    remaining: int  # tokens still to sample
    sampling: dict = field(default_factory=dict)  # do_sample, temperature, top_k, top_p
    generator: torch.Generator | None = None
    eos: int | None = None
    pending: Tensor | None = None  # (1,) the last sampled token, not yet read by the model
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" or "stop" once done
    batch: "_Batch | None" = field(default=None, repr=False)  # the last batched step's

    @property
    def cache_len(self) -> int:
        return -1 if self.mems is None else self.mems.cache_len

    def sample(self) -> int:
        """Sample the next token from the logits; the row is done after `remaining` tokens
        ("length") or at eos ("stop": the eos is returned but never read by the model)."""
        tok = sample_next(self.logits, generator=self.generator, **self.sampling)
        t = int(tok[0])
        self.remaining -= 1
        if self.eos is not None and t == self.eos:
            self.finish_reason = "stop"
        else:
            self.tokens.append(t)
            self.pending = tok
            if self.remaining == 0:
                self.finish_reason = "length"
        return t


@dataclass
class _Batch:
    """The memories and states of rows decoded together, so that the same rows' next step
    reuses them instead of stacking the rows' views again (a copy of every cache)."""
    rows: list[Row]
    mems: XLMemories
    states: Tensor

    def holds(self, group: list[Row]) -> bool:
        return len(self.rows) == len(group) and all(
            a is b and b.batch is self for a, b in zip(self.rows, group, strict=True))


@torch.inference_mode()
def step_together(model: nn.Module, rows: list[Row]) -> int:
    """Feed each row's pending token: one model call per group of rows with the same cache
    length (rows of several documents stacked as one batch). -> the number of model calls."""
    groups: dict[int, list[Row]] = {}
    for row in rows:
        if row.pending is not None:
            groups.setdefault(row.cache_len, []).append(row)
    for group in groups.values():
        if len(group) == 1:  # alone: the model's own outputs carry on (in-place cache growth)
            r = group[0]
            r.batch = None
            logits, r.mems, r.states = model(r.pending[:, None], xl_memories=r.mems,
                                             states=r.states)
            r.logits, r.pending = logits[:, -1].float(), None
            continue
        tokens = torch.cat([r.pending for r in group])[:, None]
        last = group[0].batch
        if last is not None and last.holds(group):  # the same rows as the last step
            mems, states = last.mems, last.states
        else:
            mems = XLMemories.cat([r.mems for r in group])
            states = torch.cat([r.states for r in group], dim=1)
        logits, mems, states = model(tokens, xl_memories=mems, states=states)
        batch = _Batch(group, mems, states)
        for i, r in enumerate(group):  # views: a row leaving the batch takes its own rows
            r.mems, r.states = mems.select(slice(i, i + 1)), states[:, i:i + 1]
            r.logits, r.pending, r.batch = logits[i:i + 1, -1].float(), None, batch
    return len(groups)


@dataclass
class Job:
    """A request for the scheduler: `prompt` (token ids) read after the row's memories, then up
    to row.remaining tokens. emit(event) receives {"token": id} per new token, then {"done":
    finish_reason} after finish(row) returned (it saves a session), or {"error": message}."""
    row: Row
    prompt: list[int]
    emit: Callable[[dict], None]
    finish: Callable[[Row], None] | None = None  # e.g. save the session (after the last read)
    keep_state: bool = False  # read the last token too, so the row's state follows every token


class Scheduler:
    """One thread that owns the model: prefills new jobs one by one and decodes every running
    job together, a token per job per step, until each is done."""

    def __init__(self, model: nn.Module, max_batch: int = 64):
        self.model, self.max_batch = model, max_batch
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.steps = 0  # model calls made by decoding steps (for tests and benchmarks)
        self.thread = threading.Thread(target=self._run, name="brt-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def _take(self, block: bool) -> list[Job | None]:
        jobs = []
        try:
            jobs.append(self.inbox.get(block=block))
            while True:
                jobs.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return jobs

    def _run(self) -> None:
        active: list[Job] = []
        waiting: list[Job] = []
        while True:
            new = self._take(block=not active and not waiting)
            if None in new:
                return
            waiting += new
            while waiting and len(active) < self.max_batch:
                job = waiting.pop(0)
                if self._guard(job, self._start, job):
                    active.append(job)
            if active:
                rows = [j.row for j in active]
                try:
                    with torch.no_grad():
                        self.steps += step_together(self.model, rows)
                except Exception as err:  # a bug: every running job fails, the server goes on
                    for job in active:
                        self._fail(job, err)
                    active = []
                    continue
                active = [j for j in active if self._guard(j, self._advance, j)]

    def _guard(self, job: Job, fn, *args) -> bool:
        """fn(*args) -> whether the job goes on; an exception fails the job alone."""
        try:
            return fn(*args)
        except Exception as err:
            self._fail(job, err)
            return False

    def _fail(self, job: Job, err: Exception) -> None:
        traceback.print_exc()
        job.emit({"error": f"{type(err).__name__}: {err}"})

    def _start(self, job: Job) -> bool:
        """Prefill the job's prompt (alone), then sample its first token."""
        row = job.row
        if job.prompt:
            with torch.no_grad():
                row.logits, row.mems, row.states = prefill(
                    self.model, [job.prompt], row.mems, row.states)
        return self._advance(job, first=True)

    def _advance(self, job: Job, first: bool = False) -> bool:
        """After the row's model call: finish it, or sample its next token -> still running."""
        row = job.row
        if row.finish_reason is not None or row.remaining == 0:
            # Done, and its last token read if it had to be.
            row.finish_reason = row.finish_reason or "length"
            return self._done(job)
        token = row.sample()
        if row.finish_reason != "stop":  # eos ends the text: not part of it
            job.emit({"token": token})
        if row.finish_reason is not None and not (job.keep_state and row.pending is not None):
            row.pending = None
            return self._done(job)
        return True

    def _done(self, job: Job) -> bool:
        if job.finish is not None:
            job.finish(job.row)
        job.emit({"done": job.row.finish_reason, "tokens": len(job.row.tokens)})
        return False
