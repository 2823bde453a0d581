"""The token store: a corpus's ids in one flat array read by memory map (TokenizedCorpus), and
StoreWriter, which appends documents to it as they come, a shard of tokens at a time, so that
building it takes memory bounded by the shard, not by the corpus.
"""
from __future__ import annotations

import json
import os
from array import array
from pathlib import Path

import numpy as np

from ..files import write_atomic, write_json

SHARD_TOKENS = 1 << 22  # tokens held in memory before they are appended to tokens.bin


class TokenizedCorpus:
    """All documents' ids, each document starting with bos, in one flat array: document i is
    tokens[offsets[i]:offsets[i + 1]]. num_bytes(i) is its text's UTF-8 size (for bits per byte).
    byte_counter (tokenizer.byte_counter; set by tokenize_corpus): ids -> their text's bytes, so
    that a document prefix has exact bytes too (prefix_bytes); None: whole documents only."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, num_bytes: np.ndarray,
                 names: list[str], *, bos_id: int, vocab_size: int, byte_counter=None):
        if (len(offsets) != len(names) + 1 or len(num_bytes) != len(names)
                or offsets[-1] != len(tokens)):
            raise ValueError("inconsistent corpus arrays (truncated cache?); delete the cache "
                             "directory to rebuild")
        self.tokens, self.offsets, self._num_bytes = tokens, offsets, num_bytes
        self.names = list(names)
        self.bos_id, self.vocab_size = int(bos_id), int(vocab_size)
        self.byte_counter = byte_counter

    @classmethod
    def load(cls, directory: str | os.PathLike, byte_counter=None) -> TokenizedCorpus:
        """A store written by tokenize_corpus (tokens.npy) or StoreWriter (tokens.bin, names.txt),
        its tokens memory-mapped."""
        d = Path(directory)
        manifest = json.loads((d / "manifest.json").read_text("utf-8"))
        if (d / "tokens.bin").is_file():
            size = (d / "tokens.bin").stat().st_size
            tokens = (np.memmap(d / "tokens.bin", np.dtype(manifest["dtype"]), mode="r") if size
                      else np.zeros(0, manifest["dtype"]))
            names = (d / "names.txt").read_text("utf-8").split("\n")[:-1]
        else:
            tokens, names = np.load(d / "tokens.npy", mmap_mode="r"), manifest["names"]
        return cls(tokens, np.load(d / "offsets.npy"), np.load(d / "num_bytes.npy"), names,
                   bos_id=manifest["bos_id"], vocab_size=manifest["vocab_size"],
                   byte_counter=byte_counter)

    def __len__(self) -> int:
        return len(self.names)

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"document index {i} out of range for {len(self)} documents")
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def num_bytes(self, i: int) -> int:
        return int(self._num_bytes[i])

    def prefix_bytes(self, i: int, n: int) -> int:
        """The UTF-8 bytes of document i's first n tokens (bos included), exactly."""
        if n >= self.offsets[i + 1] - self.offsets[i]:
            return self.num_bytes(i)
        if self.byte_counter is None:
            raise ValueError("this corpus cannot count the bytes of part of a document (its "
                             "tokenizer's tokens have no fixed bytes); evaluate whole documents")
        return self.byte_counter(self.doc(i)[:n])

    def subset(self, picks) -> TokenizedCorpus:
        """Documents picks = [(index, tokens or None)] in that order, as a corpus in memory: each
        whole (None, or tokens >= its length) or its first `tokens` tokens (bos included), then
        named '<name>[:<tokens>]' with the prefix's exact bytes (prefix_bytes)."""
        pieces, names, nbytes = [], [], []
        for i, n in picks:
            i, whole = int(i), n is None or n >= len(self.doc(int(i)))
            pieces.append(np.asarray(self.doc(i) if whole else self.doc(i)[:n]))
            names.append(self.names[i] if whole else f"{self.names[i]}[:{n}]")
            nbytes.append(self.num_bytes(i) if whole else self.prefix_bytes(i, n))
        offsets = np.concatenate(([0], np.cumsum([len(p) for p in pieces]))).astype(np.int64)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, self.tokens.dtype)
        return TokenizedCorpus(tokens, offsets, np.array(nbytes, np.int64), names,
                               bos_id=self.bos_id, vocab_size=self.vocab_size,
                               byte_counter=self.byte_counter)

    @property
    def doc_lengths(self) -> np.ndarray:  # in tokens, each document's bos included
        return np.diff(self.offsets)

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def total_bytes(self) -> int:
        return int(self._num_bytes.sum())


class StoreWriter:
    """Builds a store in `directory` (made; meant to be a temporary one, renamed when complete):
    add(name, ids, num_bytes) appends bos + ids to tokens.bin through a buffer of shard_tokens
    and the name to names.txt; finish(extra) writes offsets.npy, num_bytes.npy, then
    manifest.json last (a store without it is incomplete)."""

    def __init__(self, directory: str | os.PathLike, *, bos_id: int, vocab_size: int,
                 shard_tokens: int = SHARD_TOKENS):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
        self.bos_id, self.vocab_size = int(bos_id), int(vocab_size)
        self._buf, self._fill = np.empty(max(1, int(shard_tokens)), self.dtype), 0
        self._tokens = open(self.dir / "tokens.bin", "wb")
        self._names = open(self.dir / "names.txt", "w", encoding="utf-8", newline="\n")
        self.offsets, self.num_bytes = array("q", [0]), array("q")
        self.manifest: dict | None = None

    def __len__(self) -> int:
        return len(self.num_bytes)

    def add(self, name: str, ids, num_bytes: int) -> None:
        if "\n" in name:
            raise ValueError(f"document name {name!r} holds a line break")
        ids = np.asarray(ids)
        if ids.size and ids.dtype != np.uint8 and (int(ids.min()) < 0
                                                   or int(ids.max()) >= self.vocab_size):
            raise ValueError("the tokenizer produced ids outside [0, "
                             f"vocab_size={self.vocab_size})")
        self._put(np.array([self.bos_id], self.dtype))
        self._put(ids)
        self.offsets.append(self.offsets[-1] + ids.size + 1)
        self.num_bytes.append(int(num_bytes))
        self._names.write(name + "\n")

    def _put(self, ids: np.ndarray) -> None:
        while ids.size:
            k = min(ids.size, self._buf.size - self._fill)
            self._buf[self._fill:self._fill + k] = ids[:k]
            self._fill, ids = self._fill + k, ids[k:]
            if self._fill == self._buf.size:
                self._flush()

    def _flush(self) -> None:
        self._tokens.write(memoryview(self._buf[:self._fill]))  # no copy
        self._fill = 0

    def finish(self, extra: dict | None = None) -> dict:
        """Write everything and free the buffer; returns the manifest (again, once finished)."""
        if self.manifest is not None:
            return self.manifest
        self._flush()
        self._buf = None
        for f in (self._tokens, self._names):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for name, arr in (("offsets", self.offsets), ("num_bytes", self.num_bytes)):
            values = np.frombuffer(arr, np.int64) if len(arr) else np.zeros(0, np.int64)
            write_atomic(self.dir / f"{name}.npy", lambda f, a=values: np.save(f, a))
        manifest = {**(extra or {}), "format": 2, "dtype": self.dtype.name,
                    "bos_id": self.bos_id, "vocab_size": self.vocab_size, "num_docs": len(self),
                    "total_tokens": int(self.offsets[-1]), "total_bytes": int(sum(self.num_bytes))}
        write_json(self.dir / "manifest.json", manifest)
        self.manifest = manifest
        return manifest
