"""Which documents an evaluation reads, and in which order: max_docs / max_tokens keep whole
documents ("first" in corpus order or the "longest" first), or prefixes of documents where none
fits whole (books: chosen_parts), laid out so that DocumentLanes' lanes
get about equal work (lane_plan); the result does not depend on the layout.
"""

from __future__ import annotations

import heapq

import numpy as np

from ..data.corpus import TokenizedCorpus
from ..data.prefixes import prefix_plan

SELECT = ("first", "longest")


def lane_plan(lengths, lanes: int) -> tuple[np.ndarray, int]:
    """Deal documents of these lengths out to `lanes` lanes, longest first, each to the lane with
    the least work so far (LPT scheduling) -> (order, longest lane in tokens). DocumentLanes gives
    lane k the documents k, k+G, k+2G, ... of a corpus, so every lane gets n // G documents and
    n % G lanes one more; the order puts document order[t * G + k] t-th on lane k. Balanced lanes
    leave fewer rows idle as padding once the short lanes run out of documents."""
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    q, extra = divmod(n, lanes)
    members: list[list[int]] = [[] for _ in range(lanes)]
    heap = [(0, k) for k in range(lanes)]  # (tokens so far, lane)
    for i in np.argsort(-lengths, kind="stable"):
        while True:
            load, k = heapq.heappop(heap)
            if len(members[k]) < q or (len(members[k]) == q and extra > 0):
                break  # this lane may take another document
        extra -= len(members[k]) == q
        members[k].append(int(i))
        if len(members[k]) <= q:
            heapq.heappush(heap, (load + int(lengths[i]), k))
    members.sort(key=len, reverse=True)  # the lanes holding one more document come first
    order = np.empty(n, np.int64)
    for k, docs in enumerate(members):
        order[np.arange(len(docs)) * lanes + k] = docs
    return order, max((int(lengths[d].sum()) for d in members if d), default=0)


def chosen_parts(corpus: TokenizedCorpus, max_docs, max_tokens, select: str = "first"
                 ) -> list[tuple[int, int | None]]:
    """(document index, tokens to read or None for all of it) of what max_docs / max_tokens keep:
    whole documents while they fit in max_tokens predicted tokens; where not even the first
    fits (long documents, books), max_tokens spread over prefixes of the first documents
    (data.prefixes.prefix_plan: each at least PREFIX_TOKENS, at least one document)."""
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    usable = np.flatnonzero(corpus.doc_lengths >= 2)  # a bos alone has nothing to predict
    if select == "longest":
        usable = usable[np.argsort(-corpus.doc_lengths[usable], kind="stable")]
    if max_docs is not None:
        usable = usable[:max_docs]
    if max_tokens is None:
        return [(int(i), None) for i in usable]
    cum = np.cumsum(corpus.doc_lengths[usable] - 1)
    whole = int(np.searchsorted(cum, max_tokens, side="right"))
    if whole or not len(usable):
        return [(int(i), None) for i in usable[:whole]]
    plan = prefix_plan(corpus.doc_lengths[usable] - 1, max_tokens)
    return [(int(usable[k]), n + 1) for k, n in plan]


def chosen_documents(corpus: TokenizedCorpus, max_docs, max_tokens, select: str = "first"
                     ) -> np.ndarray:
    """The indices of the documents that max_docs / max_tokens keep, whole or in part (see
    chosen_parts)."""
    return np.array([i for i, _ in chosen_parts(corpus, max_docs, max_tokens, select)], np.int64)


def describe_parts(corpus: TokenizedCorpus, parts) -> str | None:
    """One line when `parts` (chosen_parts) read document prefixes; else None."""
    prefixes = [n - 1 for _, n in parts if n is not None]
    if not prefixes:
        return None
    lo, hi = min(prefixes), max(prefixes)
    each = f"{lo:,}" if lo == hi else f"{lo:,} to {hi:,}"
    nbytes = sum(corpus.prefix_bytes(i, n) for i, n in parts if n is not None)
    return (f"no whole document fits in max_tokens: scoring the first {each} tokens (after the "
            f"bos) of {len(prefixes)} document{'s' * (len(prefixes) != 1)} (prefixes, "
            f"{nbytes:,} bytes; bits per byte over those bytes)")


def select_documents(corpus: TokenizedCorpus, max_docs, max_tokens, lanes: int,
                     select: str = "first") -> tuple[TokenizedCorpus, np.ndarray]:
    """The documents to evaluate as a corpus of their own, laid out for balanced lanes (see
    lane_plan) -> (corpus, original index of each of its documents). The results do not depend
    on the layout: every row is reset at a document start. select: which documents max_docs /
    max_tokens keep, "first" in corpus order or "longest" first (fills the late positions).
    Where no whole document fits in max_tokens, the corpus holds prefixes (chosen_parts), named
    '<name>[:<tokens>]' with their exact bytes."""
    parts = chosen_parts(corpus, max_docs, max_tokens, select)
    if not parts:
        raise ValueError("the corpus has no document with text to evaluate (each needs at least "
                         "one token after its bos)")
    lengths = np.array([corpus.doc_lengths[i] if n is None else n for i, n in parts], np.int64)
    order = lane_plan(lengths, min(lanes, len(parts)))[0]
    sub = corpus.subset([parts[int(k)] for k in order])
    return sub, np.array([parts[int(k)][0] for k in order], np.int64)
