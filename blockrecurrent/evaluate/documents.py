"""Which documents an evaluation reads, and in which order: max_docs / max_tokens keep whole
documents ("first" in corpus order or the "longest" first), laid out so that DocumentLanes' lanes
get about equal work (lane_plan); the result does not depend on the layout.
"""

from __future__ import annotations

import heapq

import numpy as np

from ..data.corpus import TokenizedCorpus

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


def chosen_documents(corpus: TokenizedCorpus, max_docs, max_tokens, select: str = "first"
                     ) -> np.ndarray:
    """The indices of the documents that max_docs / max_tokens keep (see select_documents)."""
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    usable = np.flatnonzero(corpus.doc_lengths >= 2)  # a bos alone has nothing to predict
    if select == "longest":
        usable = usable[np.argsort(-corpus.doc_lengths[usable], kind="stable")]
    if max_docs is not None:
        usable = usable[:max_docs]
    if max_tokens is not None:  # whole documents only; always at least one
        cum = np.cumsum(corpus.doc_lengths[usable] - 1)
        usable = usable[:max(1, int(np.searchsorted(cum, max_tokens, side="right")))]
    return usable


def select_documents(corpus: TokenizedCorpus, max_docs, max_tokens, lanes: int,
                     select: str = "first") -> tuple[TokenizedCorpus, np.ndarray]:
    """The documents to evaluate as a corpus of their own, laid out for balanced lanes (see
    lane_plan) -> (corpus, original index of each of its documents). The results do not depend
    on the layout: every row is reset at a document start. select: which documents max_docs /
    max_tokens keep, "first" in corpus order or "longest" first (fills the late positions)."""
    usable = chosen_documents(corpus, max_docs, max_tokens, select)
    if len(usable) == 0:
        raise ValueError("the corpus has no document with text to evaluate (each needs at least "
                         "one token after its bos)")
    order = usable[lane_plan(corpus.doc_lengths[usable], min(lanes, len(usable)))[0]]
    pieces = [np.asarray(corpus.doc(int(i))) for i in order]
    offsets = np.concatenate(([0], np.cumsum([len(p) for p in pieces]))).astype(np.int64)
    sub = TokenizedCorpus(np.concatenate(pieces), offsets,
                          np.array([corpus.num_bytes(int(i)) for i in order], np.int64),
                          [corpus.names[int(i)] for i in order],
                          bos_id=corpus.bos_id, vocab_size=corpus.vocab_size)
    return sub, order
