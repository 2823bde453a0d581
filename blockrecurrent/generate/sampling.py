"""Sampling the next token from logits: temperature, top-k, top-p; and the argument checks.

Axis letters: b batch, v vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_sampling(temperature, top_k, top_p, do_sample) -> None:
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), "
                         f"got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None to keep every token), got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be a number or None, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token), got {top_p!r}")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """(b, v) logits -> float32 logits divided by the temperature, with the tokens removed by
    top-k and then top-p (nucleus, Holtzman et al. 2019) set to -inf. Always keeps the most
    likely token. temperature must be > 0 here (0 is greedy, handled by `sample_next`)."""
    check_sampling(temperature, top_k, top_p, True)
    if temperature == 0:
        raise ValueError("filter_logits needs temperature > 0; temperature 0 means greedy")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the
        # first token has nothing above it, so at least one survives.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: Tensor, do_sample: bool = True, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token of each row from (b, v) logits -> (b,) int64.
    Greedy (argmax) when do_sample is False or temperature is 0 (the usual convention, so a
    temperature sweep can include 0); otherwise sample from `filter_logits`."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- inputs ------------------------------------------------------------------------------
