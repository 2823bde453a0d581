"""Generation: chunked prefill and cached decoding (sampling.py samples; text.py: text in and out).

Axis letters: b batch, n prompt tokens, t generated tokens, v vocabulary.

The model is its own cache. Feeding a stream in any chunk sizes with the memories and states
carried gives the same logits as one call, so
- prefill reads a prompt of any length in chunks of `max_seq_len` (whole blocks): memory stays
  constant however long the prompt is, and only the last position's logits are kept;
- decoding feeds one token per call with the carried `XLMemories` (< 2W keys per layer) and
  states (the state advances when a block completes): a step costs the same at 100k tokens of
  context as at 1k, and the window is never re-run.

    tokens = generate(model, prompt, 64, temperature=0.8, top_p=0.95, seed=0)      # (b, <=64)
    res = generate(model, prompt, 64, do_sample=False, return_state=True)
    more = generate(model, None, 64, do_sample=False, past=res)  # continues exactly
    for tok in stream(model, prompt, 64): ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from ..model.config import BlockRecurrentConfig
from ..model.memories import XLMemories
from ..model.plan import WindowPlan
from .sampling import check_count, check_sampling, sample_next

__all__ = ["GenerationResult", "cache_len_after", "chunk_bounds", "generate", "prefill", "stream"]


def _check_model(model) -> None:
    """A BlockRecurrentTransformer (known by its config: model.generate calls this module, so
    it cannot import the class)."""
    if not (isinstance(model, nn.Module)
            and isinstance(getattr(model, "config", None), BlockRecurrentConfig)):
        raise TypeError(f"model must be a BlockRecurrentTransformer, got {type(model).__name__}")


def _as_batch(prompt, model: nn.Module) -> Tensor:
    """A 1-D or 2-D tensor, or a (nested) list of ints -> (b, n) int64 on the model's device."""
    if isinstance(prompt, (list, tuple)):
        try:
            prompt = torch.tensor(prompt, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"prompt must be a tensor or a list of int token ids (or a list of "
                            f"equal-length lists), could not convert it: {err}") from None
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be a torch.Tensor or a list of token ids, "
                        f"got {type(prompt).__name__}")
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2:
        raise ValueError(f"prompt must have shape (length,) or (batch, length), "
                         f"got {tuple(prompt.shape)}")
    if prompt.numel() == 0:
        raise ValueError(f"prompt must not be empty, got shape {tuple(prompt.shape)}; start a "
                         f"document with its bos token")
    num_tokens = model.config.num_tokens
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= num_tokens:
        raise ValueError(f"prompt token ids must lie in [0, num_tokens={num_tokens}), "
                         f"got values in [{lo}, {hi}]")
    return prompt.to(device=model.token_emb.weight.device, dtype=torch.long)


def _is_ragged(prompt) -> bool:
    """A list of rows (lists or 1-D tensors) that do not all have the same length."""
    if not isinstance(prompt, (list, tuple)) or len(prompt) < 2 or not all(
            isinstance(r, (list, tuple)) or (isinstance(r, Tensor) and r.dim() == 1)
            for r in prompt):
        return False
    return len({len(r) for r in prompt}) > 1


def cache_len_after(n: int, block_width: int) -> int:
    """Tokens in each layer's cache after reading a document of n tokens from its start: the
    partial block, after the last complete block once there are two (WindowPlan.next_cache)."""
    return WindowPlan.next_cache_len(block_width, 0, n)


def _check_ragged(model, lengths: list[int]) -> None:
    """Rows of different lengths decode as one batch when their caches line up: each is
    prefilled alone, then their memories are stacked (no pad token enters a state or a cache).
    That needs the same cache length (so the same position in the block, and the same step
    completing each block): equal lengths, or lengths of at least 2 * block_width that agree
    modulo block_width."""
    W = model.config.block_width
    if any(n == 0 for n in lengths):
        raise ValueError("prompt rows must not be empty; start a document with its bos token")
    caches = {cache_len_after(n, W) for n in lengths}
    if len(caches) > 1:
        raise ValueError(f"prompts of lengths {lengths} cannot be decoded as one batch: rows "
                         f"decode together when their caches line up, i.e. equal lengths, or "
                         f"lengths >= 2 * block_width = {2 * W} that agree modulo block_width = "
                         f"{W}; padding is not used (pad tokens would enter the state). Generate "
                         f"such groups in separate calls")


def _check_carry(model, b: int, mems, states) -> None:
    """Carried memories and states must fit the model and a prompt of b rows: the model's own
    checks, on a 1-token input (no compute)."""
    model._check_inputs(torch.zeros(b, 1, dtype=torch.long), mems, states, None)


# --- prefill and decoding ----------------------------------------------------------------


@torch.inference_mode()
def prefill(model: nn.Module, prompt, xl_memories: XLMemories | None = None,
            states: Tensor | None = None, chunk_size: int | None = None
            ) -> tuple[Tensor, XLMemories, Tensor]:
    """Read a prompt of any length -> (last logits (b, v), memories, states).

    Chunks of `chunk_size` tokens (default `max_seq_len`, whole blocks) keep memory constant in
    the prompt length; the first chunk is shortened to finish a partial block left in the
    carried memories, so the rest run as whole blocks."""
    _check_model(model)
    seq = _as_batch(prompt, model)
    _check_carry(model, seq.shape[0], xl_memories, states)
    W = model.config.block_width
    if chunk_size is None:
        chunk_size = model.config.max_seq_len
    check_count("chunk_size", chunk_size, 1)
    mems, logits = xl_memories, None
    cache_len = mems.cache_len if mems is not None else 0
    for a, b in chunk_bounds(seq.shape[1], cache_len, W, chunk_size):
        logits, mems, states = model(seq[:, a:b], xl_memories=mems, states=states,
                                     logits_to_keep=1)
    return logits[:, -1].float(), mems, states  # (b, v): the only logits decoding needs


def chunk_bounds(n: int, cache_len: int, block_width: int, chunk_size: int
                 ) -> Iterator[tuple[int, int]]:
    """(start, end) of the calls that read n tokens after a cache of cache_len tokens: when the
    cache ends inside a block (and chunks are at least a block), the first call finishes that
    block, so the rest, chunk_size long, run as whole blocks."""
    pos = 0
    if cache_len % block_width and chunk_size >= block_width:
        pos = min(n, block_width - cache_len % block_width)
        yield 0, pos
    while pos < n:
        yield pos, min(n, pos + chunk_size)
        pos += chunk_size


@torch.inference_mode()
def _step(model: nn.Module, tokens: Tensor, mems: XLMemories, states: Tensor,
          own: bool = False) -> tuple[Tensor, XLMemories, Tensor]:
    """One cached decoding step: (b,) tokens -> next logits (b, v), memories, states.
    own: the memories and states are the model's own outputs of the last step and the tokens
    were sampled from its logits (the model then skips its input checks: own_outputs)."""
    logits, mems, states = model(tokens[:, None], xl_memories=mems, states=states,
                                 own_outputs=own)
    return logits[:, -1].float(), mems, states


@dataclass
class GenerationResult:
    """What `generate(..., return_state=True)` returns. `xl_memories` and `states` have read the
    prompt and every generated token; `logits` are the next-token logits after them, so
    `generate(model, None, n, past=result)` continues exactly where this call stopped
    (with the same generator, so seeded sampling continues the same random stream).
    Tensors are inference tensors: `.clone()` them outside inference_mode to use them in
    autograd."""
    tokens: Tensor  # (b, t) int64, rows that emitted eos padded with eos
    xl_memories: XLMemories
    states: Tensor  # (r, b, s, e)
    logits: Tensor  # (b, v) float32
    finished: Tensor  # (b,) bool: rows that emitted eos
    generator: torch.Generator | None = None

    def select(self, rows) -> "GenerationResult":
        """The result of some rows (an int, slice or index tensor), e.g. to continue one row
        with past=: `generate(model, None, n, past=result.select(0))`. Shares the generator."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return GenerationResult(self.tokens[rows], self.xl_memories.select(rows),
                                self.states[:, rows], self.logits[rows], self.finished[rows],
                                self.generator)

    @classmethod
    def cat(cls, results: list["GenerationResult"]) -> "GenerationResult":
        """Rows of several results as one batch, to decode them together (their memories must
        hold caches of the same length: see XLMemories.cat). Tokens are joined when all have
        the same count (else the result holds none); the generator is kept if all share it."""
        if not results:
            raise ValueError("cat needs at least one GenerationResult")
        widths = {r.tokens.shape[1] for r in results}
        tokens = (torch.cat([r.tokens for r in results]) if len(widths) == 1 else
                  results[0].tokens.new_zeros(sum(r.tokens.shape[0] for r in results), 0))
        gens = {id(r.generator) for r in results}
        return cls(tokens, XLMemories.cat([r.xl_memories for r in results]),
                   torch.cat([r.states for r in results], dim=1),
                   torch.cat([r.logits for r in results]),
                   torch.cat([r.finished for r in results]),
                   results[0].generator if len(gens) == 1 else None)


class _Decoder:
    """The decoding loop as an object, so generate, stream and generate_text share it and a
    caller can take the memories/states (and timings) when it stops."""

    def __init__(self, model, logits, mems, states, finished, *, sampling: dict,
                 eos_token_id, generator):
        self.model, self.logits, self.mems, self.states = model, logits, mems, states
        self.finished, self.sampling, self.eos = finished, sampling, eos_token_id
        self.generator = generator
        self.pending = None  # the last sampled token, not yet read by the model
        self.steps, self.decode_seconds = 0, 0.0  # model steps; their time plus sampling's

    def feed_pending(self) -> None:
        if self.pending is not None:
            # The first step reads what the caller passed (a prefill's or a past result's
            # memories): checked; later steps read the last step's outputs. With
            # model.fast_decode False every step is checked, as before the fast step.
            own = self.steps > 0 and self.model.fast_decode
            self.logits, self.mems, self.states = _step(self.model, self.pending, self.mems,
                                                        self.states, own=own)
            self.steps += 1
            self.pending = None

    def tokens(self, max_new_tokens: int) -> Iterator[Tensor]:
        """Yields (b,) tokens. The model reads each token lazily, just before sampling the next,
        so a stream shows every token as soon as it is sampled."""
        for _ in range(max_new_tokens):
            if self.eos is not None and bool(self.finished.all()):
                return
            t0 = time.perf_counter()
            self.feed_pending()
            with torch.inference_mode():
                tok = sample_next(self.logits, generator=self.generator, **self.sampling)
                if self.eos is not None:
                    tok = torch.where(self.finished, self.eos, tok)  # finished rows pad with eos
                    self.finished = self.finished | (tok == self.eos)
            if self.steps:  # the first token is sampled from the prefill's logits
                self.decode_seconds += time.perf_counter() - t0
            self.pending = tok
            yield tok


@dataclass
class _Request:
    """Checked and normalised arguments of one generation call."""
    model: nn.Module
    seq: Tensor | None  # (b, n), None to continue from past
    max_new_tokens: int
    sampling: dict
    eos_token_id: int | None
    xl_memories: XLMemories | None
    states: Tensor | None
    generator: torch.Generator | None
    past: GenerationResult | None


def _check(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
           do_sample=True, eos_token_id=None, xl_memories=None, states=None, generator=None,
           seed=None, past=None) -> _Request:
    """Every check of a generation call, and nothing else: no model work happens here."""
    _check_model(model)
    check_count("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_k, top_p, do_sample)
    if eos_token_id is not None:
        check_count("eos_token_id", eos_token_id, 0)
        if eos_token_id >= model.config.num_tokens:
            raise ValueError(f"eos_token_id must lie in [0, num_tokens={model.config.num_tokens}),"
                             f" got {eos_token_id}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        check_count("seed", seed, 0)
    if past is not None:
        if not isinstance(past, GenerationResult):
            raise TypeError(f"past must be the GenerationResult of generate(..., "
                            f"return_state=True), got {type(past).__name__}")
        if xl_memories is not None or states is not None:
            raise ValueError("pass either past or xl_memories/states, not both")
        xl_memories, states = past.xl_memories, past.states
        if generator is None and seed is None:
            generator = past.generator  # seeded sampling continues the same random stream
    if prompt is None:
        if past is None:
            raise ValueError("prompt must not be None (it may be None only to continue from past)")
        seq = None
    elif _is_ragged(prompt):
        if xl_memories is not None or states is not None:
            raise ValueError("prompts of different lengths start new documents: they take no "
                             "xl_memories, states or past (continue each row separately)")
        seq = [_as_batch(row, model) for row in prompt]  # one (1, n_i) tensor per row
        _check_ragged(model, [row.shape[1] for row in seq])
    else:
        seq = _as_batch(prompt, model)
        _check_carry(model, seq.shape[0], xl_memories, states)
    if seed is not None:
        generator = torch.Generator(device=model.token_emb.weight.device).manual_seed(seed)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    return _Request(model, seq, max_new_tokens, sampling, eos_token_id, xl_memories, states,
                    generator, past)


def _start(req: _Request) -> _Decoder:
    """Prefill the prompt (if any) and return the decoder, ready for its first token."""
    if req.seq is None:  # continue from past: its logits already follow its last token
        logits, mems, states = req.past.logits, req.xl_memories, req.states
        finished = req.past.finished
    elif isinstance(req.seq, list):  # rows of different lengths: prefilled one by one
        rows = [prefill(req.model, row) for row in req.seq]
        logits = torch.cat([r[0] for r in rows])
        mems = XLMemories.cat([r[1] for r in rows])
        states = torch.cat([r[2] for r in rows], dim=1)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
    else:
        logits, mems, states = prefill(req.model, req.seq, req.xl_memories, req.states)
        finished = torch.zeros(req.seq.shape[0], dtype=torch.bool, device=logits.device)
    return _Decoder(req.model, logits, mems, states, finished, sampling=req.sampling,
                    eos_token_id=req.eos_token_id, generator=req.generator)


class _EvalMode:
    """model.eval() for the duration, then the previous training mode back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def generate(model: nn.Module, prompt, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             do_sample: bool = True, eos_token_id: int | None = None,
             xl_memories: XLMemories | None = None, states: Tensor | None = None,
             generator: torch.Generator | None = None, seed: int | None = None,
             return_state: bool = False, past: GenerationResult | None = None):
    """Generate up to max_new_tokens tokens after `prompt` -> (b, t) int64 new tokens.

    prompt: (b, n) or (n,) token ids (a tensor or lists), of any length; it continues from
    xl_memories/states when given (e.g. a conversation's memories), or from `past` (the result of
    an earlier call with return_state=True; prompt may then be None to just keep generating).
    Sampling: greedy when do_sample is False or temperature == 0; otherwise temperature, then
    top-k, then top-p filtering. Seeded with `seed` (a fresh generator) or `generator`.
    eos_token_id: a row stops after emitting it (the rest of the row is padded with it) and
    generation stops when every row has. return_state=True returns a GenerationResult instead
    of the tokens (one more model step, to read the last token).
    Runs under torch.inference_mode, in eval mode (the model's training mode is restored)."""
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {type(return_state).__name__}")
    req = _check(model, prompt, max_new_tokens, temperature, top_k, top_p, do_sample,
                 eos_token_id, xl_memories, states, generator, seed, past)
    with _EvalMode(model):
        dec = _start(req)
        out = list(dec.tokens(max_new_tokens))
        tokens = (torch.stack(out, dim=1) if out else
                  torch.empty(dec.logits.shape[0], 0, dtype=torch.long, device=dec.logits.device))
        if not return_state:
            return tokens
        dec.feed_pending()  # so the returned memories have read every returned token
    return GenerationResult(tokens, dec.mems, dec.states, dec.logits, dec.finished, dec.generator)


def stream(model: nn.Module, prompt, max_new_tokens: int,
           **kwargs) -> Iterator[int | Tensor]:
    """Like `generate` (same keyword arguments, but no return_state), yielding each new token as
    soon as it is sampled: an int when the batch has one row, else a (b,) tensor. Arguments are
    checked when stream() is called; the prefill runs at the first next(). The model stays in
    eval mode until the iterator is exhausted or closed."""
    if "return_state" in kwargs:
        raise TypeError("stream() takes no return_state; use generate(..., return_state=True)")
    req = _check(model, prompt, max_new_tokens, **kwargs)  # now, not at the first next()

    def tokens():
        # inference_mode is entered per step inside the decoder, never across a yield, so the
        # caller's code between tokens runs in its own grad mode.
        with _EvalMode(model):
            dec = _start(req)
            single = dec.logits.shape[0] == 1
            for tok in dec.tokens(max_new_tokens):
                yield int(tok[0]) if single else tok

    return tokens()
