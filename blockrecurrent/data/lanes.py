"""Document lanes: the batches of a recurrent training run, each row ("lane") reading one document
segment after segment, with `reset` where a row starts a new document (its state is cleared).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from .corpus import TokenizedCorpus


def _empty_lanes(usable: np.ndarray, lanes: int) -> int:
    """How many of `lanes` lanes get no document: lane j reads the documents i % lanes == j."""
    return int((np.bincount(usable % lanes, minlength=lanes) == 0).sum())


def lanes_that_fit(doc_lengths, world_size: int = 1, limit: int | None = None) -> int:
    """The largest batch_size (up to `limit`) whose batch_size * world_size lanes all get a
    document of these lengths (in tokens, bos included); 0 if not even one per process does."""
    usable = np.flatnonzero(np.asarray(doc_lengths) >= 2)
    top = len(usable) // world_size
    for b in range(min(top, limit) if limit is not None else top, 0, -1):
        if not _empty_lanes(usable, b * world_size):
            return b
    return 0


class DocumentLanes:
    """Batches for recurrence: row k of each batch continues the document it read in the last one.

    Global lane j of G = batch_size * world_size reads the documents whose index i % G == j, in an
    order reshuffled each epoch from (seed, j, epoch). Rank r owns lanes r*batch_size ... so the
    rows of a run do not depend on how its lanes are spread over ranks."""

    def __init__(self, corpus: TokenizedCorpus, batch_size: int, segment_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, loop: bool = True):
        for name, v, low in (("batch_size", batch_size, 1), ("segment_len", segment_len, 1),
                             ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} must be < world_size {world_size}")
        self.corpus, self.batch_size, self.segment_len = corpus, int(batch_size), int(segment_len)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.loop = bool(shuffle), bool(loop)
        G = self.batch_size * self.world_size
        usable = np.flatnonzero(corpus.doc_lengths >= 2)  # a bos alone has no target to predict
        if _empty_lanes(usable, G):
            fits = lanes_that_fit(corpus.doc_lengths, self.world_size, self.batch_size)
            procs = f" x {world_size} processes" if world_size > 1 else ""
            raise ValueError(f"batch_size={batch_size}{procs} asks for {G} batch rows, each "
                             f"reading its own documents, but the corpus has only {len(usable)} "
                             f"document{'s' * (len(usable) != 1)} with text for them"
                             + "; lower batch_size or world_size"
                             + (f" (batch_size={fits} fits)" if fits else "")
                             + " or add documents")
        first = self.rank * self.batch_size
        self._docs = [usable[usable % G == first + k] for k in range(self.batch_size)]
        self._epoch = [0] * self.batch_size
        self._pos = [0] * self.batch_size  # index into the lane's document order for this epoch
        self._offset = [0] * self.batch_size  # index in the document of the next input token
        self._orders: list = [None] * self.batch_size  # cache: (epoch, order)
        self._seen = self._padded = self._batches = 0

    def _order(self, k: int) -> np.ndarray:
        if self._orders[k] is None or self._orders[k][0] != self._epoch[k]:
            docs = self._docs[k]
            if self.shuffle:  # seeded by the global lane, so independent of rank layout
                rng = np.random.default_rng([self.seed, self.rank * self.batch_size + k,
                                             self._epoch[k]])
                docs = docs[rng.permutation(len(docs))]
            self._orders[k] = (self._epoch[k], docs)
        return self._orders[k][1]

    def _lane_done(self, k: int) -> bool:
        return self._pos[k] >= len(self._docs[k])  # only reachable with loop=False

    @property
    def exhausted(self) -> bool:
        """True once every lane of this rank has read all of its documents (loop=False)."""
        return all(self._lane_done(k) for k in range(self.batch_size))

    @property
    def padding_fraction(self) -> float:
        return self._padded / self._seen if self._seen else 0.0

    def next_batch(self) -> dict[str, torch.Tensor]:
        b, T = self.batch_size, self.segment_len
        inputs = np.full((b, T), self.corpus.bos_id, np.int64)  # padding: bos in, 0 out, masked out
        targets, mask = np.zeros((b, T), np.int64), np.zeros((b, T), bool)
        positions, reset = np.full((b, T), -1, np.int64), np.ones(b, bool)
        doc_index = np.full(b, -1, np.int64)
        for k in range(b):
            if self._lane_done(k):
                continue
            i, p = int(self._order(k)[self._pos[k]]), self._offset[k]
            ids = self.corpus.doc(i)
            n = min(T, len(ids) - 1 - p)  # never past this document's last target
            inputs[k, :n], targets[k, :n] = ids[p:p + n], ids[p + 1:p + 1 + n]
            mask[k, :n], positions[k, :n] = True, np.arange(p, p + n)
            reset[k], doc_index[k] = p == 0, i
            if p + n < len(ids) - 1:
                self._offset[k] = p + n
            else:  # document done: this row's next segment starts the next one
                self._offset[k], self._pos[k] = 0, self._pos[k] + 1
                if self.loop and self._pos[k] == len(self._docs[k]):
                    self._pos[k], self._epoch[k] = 0, self._epoch[k] + 1
        self._seen += b * T
        self._padded += b * T - int(mask.sum())
        self._batches += 1
        arrays = dict(inputs=inputs, targets=targets, loss_mask=mask, reset=reset,
                      positions=positions, doc_index=doc_index)
        return {key: torch.from_numpy(v) for key, v in arrays.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.loop or not self.exhausted:
            yield self.next_batch()

    def _config(self) -> dict:
        return {"batch_size": self.batch_size, "segment_len": self.segment_len, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle,
                "loop": self.loop,
                "num_docs": len(self.corpus), "total_tokens": int(self.corpus.total_tokens)}

    def state_dict(self) -> dict:
        """Plain ints and lists (JSON-serialisable), covering this rank's lanes only."""
        return {"format": 1, "config": self._config(), "epoch": list(self._epoch),
                "pos": list(self._pos), "offset": list(self._offset), "seen_targets": self._seen,
                "padded_targets": self._padded, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError("not a DocumentLanes state_dict (no 'format': 1)")
        saved = state.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in self._config().items() if saved.get(k) != v}
        if diff:
            raise ValueError("lanes state was saved with other settings ({name: (saved, "
                             f"current)}}: {diff}); build DocumentLanes with the saved settings "
                             "and corpus to resume")
        lanes = [[int(x) for x in state[k]] for k in ("epoch", "pos", "offset")]
        if any(len(v) != self.batch_size for v in lanes):
            raise ValueError(f"state_dict lane lists must have batch_size = {self.batch_size} "
                             "entries")
        self._epoch, self._pos, self._offset = lanes
        self._seen, self._padded, self._batches = (
            int(state[k]) for k in ("seen_targets", "padded_targets", "batches"))
