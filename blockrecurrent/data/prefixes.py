"""Evaluation budgets over long documents (books): when no whole document fits in a token budget,
spread it over the first documents, each read from its start (prefix_plan); the corpus's
TokenizedCorpus.subset then holds those prefixes with their exact UTF-8 bytes.
"""
from __future__ import annotations

PREFIX_TOKENS = 4096  # the shortest prefix a budget is spread over (unless it is smaller)


def prefix_plan(lengths, budget: int, min_prefix: int = PREFIX_TOKENS) -> list[tuple[int, int]]:
    """(position in `lengths`, tokens to read) pairs spreading `budget` over the first entries
    with a length >= 1 (lengths and budget in the same units, e.g. predicted tokens): as many
    as leave each at least min_prefix (at least one), the budget split evenly, an entry shorter
    than its share read whole and its leftover passed on to the next."""
    if budget < 1:
        return []
    usable = [i for i, n in enumerate(lengths) if n >= 1]
    count = min(len(usable), max(1, budget // min_prefix))
    plan, left = [], budget
    for k, i in enumerate(usable[:count]):
        take = min(int(lengths[i]), left // (count - k))
        if take >= 1:
            plan.append((i, take))
            left -= take
    return plan
