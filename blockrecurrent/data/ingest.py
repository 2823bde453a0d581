"""Streaming ingest: a source's documents read one at a time, split (its own split or the hash
split), tokenized a batch at a time and appended to one token store per split (data/store.py),
so that memory depends on the batch and shard sizes, not on the corpus. A built store is found
again from the source files' names, sizes and modification times (verify="stat", no reading of
the corpus), or from a hash of their contents (verify="content"); its ingest.json is written
last and the whole directory renamed into place, so an interrupted build is never taken for a
finished one.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..files import make_temp_dir, write_json
from .corpus import (
    _STDLIB_SKIP,
    Document,
    _unit_hash,
    iter_documents,
    load_documents,
    split_documents,
)
from .splits import find_splits, load_splits
from .store import SHARD_TOKENS, StoreWriter, TokenizedCorpus
from .tokenizer import ByteTokenizer, byte_counter

VERIFY = ("stat", "content")
BATCH_BYTES = 8 << 20  # text tokenized at a time (the byte tokenizer: a document at a time)
SPLITS = ("train", "val", "test")
TRIM_BYTES = 32 << 20  # text between two _trim_heap calls


def source_files(source) -> list[str]:
    """The files a source is read from, sorted: the standard library's .py files for 'stdlib',
    the file itself, every non-hidden file under a directory, or a glob pattern's matches."""
    src = os.fspath(source)
    if src == "stdlib":
        root, found = Path(sysconfig.get_paths()["stdlib"]), []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
            found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
        return sorted(map(str, found))
    if os.path.isfile(src):
        return [src]
    if os.path.isdir(src):  # strings, not Path objects: a small list for many files
        return sorted(str(p) for p in Path(src).rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(src).parts))
    return sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))


def source_fingerprint(source, verify: str = "stat") -> str:
    """A digest of the source's files: their paths, sizes and modification times ("stat": no
    file is read), or their paths and contents ("content": every byte is read and hashed)."""
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
    h = hashlib.sha1(verify.encode())
    for path in source_files(source):
        h.update(os.fsencode(path) + b"\0")
        if verify == "stat":
            st = os.stat(path)
            h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
            continue
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _store_key(source, tokenizer, text_field: str, val_fraction: float,
               test_fraction: float) -> dict:
    src = os.fspath(source)
    return {"format": 2, "source": src if src == "stdlib" else os.path.abspath(src),
            "text_field": text_field, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "tokenizer_kind": tokenizer.kind,
            "tokenizer_fingerprint": tokenizer.fingerprint, "bos_id": int(tokenizer.bos_id),
            "vocab_size": int(tokenizer.vocab_size)}


def store_dir(cache_dir, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"store-{digest}"


class _OutOfOrder(Exception):
    """The documents did not come in name order: build from the sorted list instead."""


def _encoded(batch: list[Document], tokenizer) -> Iterator[tuple[Document, object, int]]:
    """(document, ids, UTF-8 bytes) per document; the byte tokenizer at memory speed."""
    if isinstance(tokenizer, ByteTokenizer):
        for d in batch:
            ids = tokenizer.encode_array(d.text)
            yield d, ids, ids.size
        return
    for d, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
        yield d, ids, len(d.text.encode("utf-8"))


def _batches(docs: Iterable[Document], batch_bytes: int) -> Iterator[list[Document]]:
    batch, size, last = [], 0, None
    for d in docs:
        if last is not None and d.name <= last:
            raise _OutOfOrder(d.name)
        batch.append(d)
        size, last = size + len(d.text), d.name
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _trim_heap() -> None:
    """Hand glibc's free heap pages back to the system: without it, documents of varied sizes
    leave a heap that creeps up with their number (a persistent mallopt would change the
    allocator for the whole process)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write(docs: Iterable[Document], route: Callable[[str], str], writers: dict, tokenizer,
           batch_bytes: int) -> None:
    if isinstance(tokenizer, ByteTokenizer):
        batch_bytes = 1  # nothing to gain from batches: a document at a time
    since_trim = 0
    for batch in _batches(docs, batch_bytes):
        for d, ids, nbytes in _encoded(batch, tokenizer):
            writers[route(d.name)].add(d.name, ids, nbytes)
            since_trim += nbytes
        del batch, d, ids
        if since_trim >= TRIM_BYTES:
            _trim_heap()
            since_trim = 0


def _prefixed(path: Path, text_field: str) -> Iterator[Document]:
    docs = iter_documents(path, text_field)  # as data/splits.load_splits names them
    return (Document(f"{path.name}/{d.name}", d.text) for d in docs) if path.is_dir() else docs


def _stream_build(source, tokenizer, writers, text_field, val_fraction, test_fraction,
                  batch_bytes) -> bool:
    """Fill the writers in one pass; False where the hash split has to move a document into
    an empty split (a tiny corpus: split_documents decides, from the whole list)."""
    own = find_splits(source)
    if own is not None:
        for split, path in own.items():
            _write(_prefixed(path, text_field), lambda name, s=split: s, writers, tokenizer,
                   batch_bytes)
            if not len(writers[split]):
                raise ValueError(f"every document from {str(path)!r} is empty; point at a "
                                 "corpus with some text")
            writers[split].finish()  # its buffer freed: one split's buffer in memory at a time
        return True

    def route(name: str) -> str:
        u = _unit_hash(name)
        return ("test" if u < test_fraction else "val" if u < test_fraction + val_fraction
                else "train")

    _write(iter_documents(source, text_field), route, writers, tokenizer, batch_bytes)
    total = sum(len(w) for w in writers.values())
    if not total:
        raise ValueError(f"every document from {os.fspath(source)!r} is empty; point at a "
                         "corpus with some text")
    wanted = [("train", 1.0)] + ([("val", val_fraction), ("test", test_fraction)]
                                 if total >= 3 else [])
    return all(len(writers[s]) for s, frac in wanted if frac > 0)


def _build(source, tokenizer, tmp: Path, text_field, val_fraction, test_fraction,
           shard_tokens, batch_bytes) -> dict[str, dict]:
    def fresh() -> dict:
        for s in SPLITS:
            shutil.rmtree(tmp / s, ignore_errors=True)
        return {s: StoreWriter(tmp / s, bos_id=tokenizer.bos_id,
                               vocab_size=tokenizer.vocab_size, shard_tokens=shard_tokens)
                for s in SPLITS}

    writers = fresh()
    try:
        done = _stream_build(source, tokenizer, writers, text_field, val_fraction, test_fraction,
                             batch_bytes)
    except _OutOfOrder:
        done = False
    if not done:  # the documents in memory, sorted and split as load_splits does
        writers = fresh()
        for split, docs in load_splits(source, text_field, val_fraction, test_fraction).items():
            _write(docs, lambda name, s=split: s, writers, tokenizer, batch_bytes)
    return {s: w.finish() for s, w in writers.items()}


def _load(root: Path, manifest: dict, tokenizer) -> dict[str, TokenizedCorpus | None]:
    counter = byte_counter(tokenizer)
    return {s: TokenizedCorpus.load(root / s, counter) if manifest["splits"][s] else None
            for s in SPLITS}


def _current(root: Path, key: dict, verify: str, fingerprint: str) -> dict | None:
    try:
        manifest = json.loads((root / "ingest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in key.items()):
        return None
    return manifest if manifest.get("files", {}).get(verify) == fingerprint else None


def ingest(source, tokenizer, cache_dir, *, text_field: str = "text",
           val_fraction: float = 0.05, test_fraction: float = 0.05, verify: str = "stat",
           shard_tokens: int = SHARD_TOKENS, batch_bytes: int = BATCH_BYTES,
           log: Callable[[str], None] | None = None) -> dict[str, TokenizedCorpus | None]:
    """{'train', 'val', 'test'} -> the split's token store (None where it is empty) under
    cache_dir/store-<key>: the documents of data.splits.load_splits (its own split or the hash
    split with these fractions), the same ids as data.tokenize_corpus, built by streaming
    unless a finished store of the same source files (verify: "stat" or "content", see
    source_fingerprint), tokenizer and split is there already. log: a line before a build."""
    split_documents([], val_fraction, test_fraction)  # checks the fractions
    key = _store_key(source, tokenizer, text_field, val_fraction, test_fraction)
    root = store_dir(cache_dir, key)
    fingerprint = source_fingerprint(source, verify)
    manifest = _current(root, key, verify, fingerprint)
    if manifest is not None:
        return _load(root, manifest, tokenizer)
    if not source_files(source) and os.fspath(source) != "stdlib":
        load_documents(source, text_field)  # its error: no such file, directory or match
    if log:
        log(f"building the token store of {os.fspath(source)!r} in {root}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, f".tmp-{root.name}-")
    try:
        splits = _build(source, tokenizer, tmp, text_field, val_fraction, test_fraction,
                        shard_tokens, batch_bytes)
        files = {verify: fingerprint}
        if verify != "stat":
            files["stat"] = source_fingerprint(source, "stat")
        manifest = {**key, "files": files, "splits": {s: m["num_docs"] for s, m in splits.items()},
                    "total_bytes": sum(m["total_bytes"] for m in splits.values())}
        write_json(tmp / "ingest.json", manifest)  # last: it marks a finished store
        old = root.with_name(f"{root.name}.old-{os.getpid()}")
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(root, manifest, tokenizer)
