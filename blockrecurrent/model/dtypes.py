"""Dtype names, the one table for the whole package: one canonical name per dtype (torch's own:
"float32", "bfloat16", "float16") and the short aliases ("fp32", "bf16", "fp16") accepted on
input only. Every setting, option and result names a dtype by its canonical name; the trainer
(train.settings), evaluation, `brt eval --dtype` and the benchmark (`--dtypes fp32 bf16` still
works) read names through dtype_name. No torch import at module level: settings and --help are
read without torch.
"""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")  # canonical names, torch's
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHORT = {canonical: alias for alias, canonical in ALIASES.items()}  # table labels only
DTYPE_NAMES = (*DTYPES, *ALIASES)  # every name accepted on input


def dtype_name(name: str) -> str:
    """The canonical name of a dtype name or alias ('bf16' -> 'bfloat16'); ValueError if unknown."""
    if isinstance(name, str) and name in DTYPES:
        return name
    if isinstance(name, str) and name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"unknown dtype {name!r}; use one of {DTYPES} (or {tuple(ALIASES)})")


def names_of(dtypes) -> tuple[str, ...]:
    """Every name accepted for these canonical dtypes, canonical names first (choices of an
    option: `names_of(("float32", "bfloat16"))` -> float32, bfloat16, fp32, bf16)."""
    dtypes = tuple(dtype_name(d) for d in dtypes)
    return (*dtypes, *(a for a, c in ALIASES.items() if c in dtypes))


def short_name(name: str) -> str:
    """The short label of a dtype ('bfloat16' -> 'bf16'), for narrow table columns."""
    return SHORT[dtype_name(name)]


def torch_dtype(name: str):
    """The torch dtype of a name or alias ('bf16', 'bfloat16', 'fp32', ...)."""
    import torch  # here: settings are read (and --help shown) without torch

    return getattr(torch, dtype_name(name))
