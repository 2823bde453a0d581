"""Data: corpora, choosing a tokenizer (the tokenizers: tokenizer.py), a memory-mapped token cache;
the document lanes that batch it for recurrence are in lanes.py (all re-exported here).

Recurrent state flows from one segment to the next, so a batch row ("lane") reads one document
segment after segment, and `reset` marks where a row starts a new document (state is cleared)."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from ..files import make_temp_dir, write_atomic, write_json
from .formats import DATA_SUFFIXES, is_arrow_dataset, iter_data_file, open_jsonl
from .store import TokenizedCorpus
from .tokenizer import (
    _CONFIG,
    ByteTokenizer,
    _import_tokenizers,
    byte_counter,
    load_tokenizer,
    train_bpe,
)

__all__ = ["Document", "TokenizedCorpus", "iter_documents", "iter_jsonl", "iter_stdlib",
           "iter_text_files", "load_documents", "make_tokenizer", "split_documents",
           "tokenize_corpus"]
_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                          "__pycache__"})


class Document(NamedTuple):
    name: str  # stable path-like id: used for sorting, splitting and cache keys
    text: str


# ----------------------------------------------------------------------------------- corpora

def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path} looks binary (it contains NUL bytes); documents must be UTF-8 "
                         "text: remove the file or use a glob pattern that leaves it out")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to "
                         "UTF-8 or use a glob pattern that leaves it out") from None


def _glob_base(pattern: str) -> str:
    """The directories of `pattern` before its first wildcard: document names are relative to it."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else "."


def iter_text_files(pattern_or_dir: str | os.PathLike) -> Iterator[Document]:
    """Every file under a directory (recursively; hidden entries skipped) or matching a glob
    pattern is one document, named by its posix path relative to the directory (or the pattern's
    fixed part)."""
    src = os.fspath(pattern_or_dir)
    if os.path.isdir(src):
        base = src
        paths = (p for p in Path(src).rglob("*")
                 if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(src).parts))
    else:
        base = _glob_base(src)
        paths = (p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
    # strings, not Path objects: a corpus of many files keeps a small list
    named = sorted((os.path.relpath(p, base).replace(os.sep, "/"), os.fspath(p)) for p in paths)
    if not named and os.path.isdir(src):
        raise ValueError(f"directory {src!r} holds no (non-hidden) files; point at a directory "
                         "of text files")
    if not named:
        raise ValueError(f"no file matches {src!r}: give an existing directory, file or glob "
                         "pattern (e.g. 'data/**/*.txt')")
    return (Document(name, _read_text(Path(p))) for name, p in named)


def iter_jsonl(path: str | os.PathLike, text_field: str = "text") -> Iterator[Document]:
    """One JSON object per line with the text in `text_field`; named '<file name>/<line number>'.
    A .jsonl.gz / .jsonl.zst file is decompressed as it is read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"JSONL file {str(path)!r} does not exist")

    def documents():
        with open_jsonl(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if isinstance(text, str):
                        text.encode("utf-8")  # rejects lone surrogates such as "\ud800"
                except (UnicodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}, line {lineno}: not valid UTF-8 JSON text ({e}); fix "
                                     "the line") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}, line {lineno}: expected a JSON object with a "
                                     f"string field {text_field!r}; fix the line or pass "
                                     "text_field= naming the text's field")
                # zero-padded: sorts in line order
                yield Document(f"{path.name}/{lineno:09d}", text)

    return documents()


def iter_stdlib() -> Iterator[Document]:
    """The running Python's standard library `.py` files, leaving out test packages and caches."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune: never descend into them
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    if not found:
        raise ValueError(f"no .py files under the standard library directory {root}; use another "
                         "corpus")
    named = sorted((p.relative_to(root).as_posix(), p) for p in found)
    return (Document(name, _read_text(p)) for name, p in named)


def _data_files(src: str) -> tuple[str, list[Path]]:
    """(base, files) when every (non-hidden) file of directory `src`, or every match of glob
    pattern `src` (e.g. 'data/train-*.parquet'), is a data file (JSONL, gzip/zstd JSONL,
    Parquet, Arrow): a folder or set of shards; else (base, [])."""
    if os.path.isdir(src):
        base = src
        found = (p for p in Path(src).rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(src).parts))
    elif any(c in src for c in "*?["):
        base = _glob_base(src)
        found = (Path(p) for p in glob.glob(src, recursive=True) if os.path.isfile(p))
    else:
        return src, []
    files = sorted(found, key=lambda p: p.relative_to(base).as_posix() + "/")  # names' order
    return base, files if files and all(p.name.endswith(DATA_SUFFIXES) for p in files) else []


def _iter_data_dir(base: str, files: list[Path], text_field: str) -> Iterator[Document]:
    for path in files:  # each document named '<path relative to base>/<row>'
        parent = path.parent.relative_to(base).as_posix()
        for name, text in iter_data_file(path, text_field, iter_jsonl):
            yield Document(name if parent == "." else f"{parent}/{name}", text)


def iter_documents(source: str | os.PathLike, text_field: str = "text") -> Iterator[Document]:
    """load_documents' documents one at a time, read as they are needed, in name order for
    every kind of source (load_documents sorts them all the same), the empty ones left out."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError("source must be a path, glob pattern or 'stdlib', not "
                        f"{type(source).__name__}")
    src = os.fspath(source)
    if src == "stdlib":
        docs = iter_stdlib()
    elif (src.endswith(DATA_SUFFIXES) and os.path.isfile(src)) or is_arrow_dataset(src):
        docs = (Document(*d) for d in iter_data_file(src, text_field, iter_jsonl))
    elif _data_files(src)[1]:
        docs = _iter_data_dir(*_data_files(src), text_field)
    else:
        docs = iter_text_files(src)
    return (d for d in docs if d.text)


def load_documents(source: str | os.PathLike, text_field: str = "text") -> list[Document]:
    """'stdlib' (built-in corpus; write './stdlib' for a directory of that name), a JSONL file
    (.jsonl, .jsonl.gz, .jsonl.zst), a Parquet or Arrow file, a `datasets` save_to_disk
    directory, a directory or glob pattern of such data files, a directory of text files, or a
    glob pattern of text files (data/formats.py). Empty documents are dropped; the result is
    sorted by name."""
    docs = sorted(iter_documents(source, text_field), key=lambda d: d.name)
    if not docs:
        raise ValueError(f"every document from {os.fspath(source)!r} is empty; point at a corpus "
                         "with some text")
    return docs


def _check_docs(docs) -> list[Document]:
    docs = list(docs)
    for d in docs:
        if not (isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], str)
                and isinstance(d[1], str)):
            raise TypeError("documents must be (name, text) pairs of str (see load_documents), "
                            f"got {d!r:.80}")
    return [Document(*d) for d in docs]


def _unit_hash(name: str) -> float:
    """A stable number in [0, 1) per name (the builtin hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: Sequence[Document], val_fraction: float = 0.05,
                    test_fraction: float = 0.05) -> dict[str, list[Document]]:
    """Whole documents go to 'train', 'val' or 'test' by a hash of their name, so adding or removing
    documents never moves the others. With >= 3 documents, every split with a fraction > 0 (train
    always) gets one: an empty split takes the smallest-hash document of the largest split. With
    fewer documents val/test may be empty, train never. Each split keeps the input order."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves "
                         "no training data; keep the sum below 1")
    docs = _check_docs(docs)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, d in enumerate(docs):
        u = _unit_hash(d.name)
        split = ("test" if u < test_fraction else "val" if u < test_fraction + val_fraction
                 else "train")
        splits[split].append(i)
    # Train always gets a document, so that a one-file corpus trains too.
    wanted = [("train", 1.0)] + ([("val", val_fraction), ("test", test_fraction)]
                                 if len(docs) >= 3 else [])
    for key, frac in wanted:
        if docs and frac > 0 and not splits[key]:
            donor = max(splits, key=lambda k: len(splits[k]))  # with >= 3 documents, >= 2
            moved = min(splits[donor], key=lambda i: _unit_hash(docs[i].name))
            splits[donor].remove(moved)
            splits[key].append(moved)
    return {k: [docs[i] for i in sorted(v)] for k, v in splits.items()}


# -------------------------------------------------------------------------------- tokenizers
# The tokenizers themselves are in tokenizer.py; make_tokenizer picks, trains and caches one.

def make_tokenizer(kind: str | os.PathLike, train_texts=None, vocab_size: int | None = None,
                   cache_dir: str | os.PathLike | None = None):
    """kind 'byte', 'bpe' (trained on train_texts, Documents or str, and cached in cache_dir under a
    hash of their names, contents and vocab_size), or a directory holding a tokenizer."""
    if not isinstance(kind, (str, os.PathLike)):
        raise TypeError("tokenizer kind must be 'byte', 'bpe' or a directory path, not "
                        f"{type(kind).__name__}")
    kind = os.fspath(kind)
    if kind == "bpe":
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError("tokenizer 'bpe' needs vocab_size, an int >= 257 (e.g. 8192), got "
                             f"{vocab_size!r}")
        if not train_texts:
            raise ValueError("tokenizer 'bpe' needs train_texts (the training documents) to learn "
                             "merges from")
        _import_tokenizers()  # fail early, before hashing the corpus, if the package is missing
        docs = _check_docs(Document(f"#{i}", t) if isinstance(t, str) else t
                           for i, t in enumerate(train_texts))
        target = Path(cache_dir or ".") / f"bpe-{vocab_size}-{_docs_hash(docs)[:16]}"
        if cache_dir is not None and (target / _CONFIG).is_file():
            return load_tokenizer(target)
        tok = train_bpe((d.text for d in docs), vocab_size)
        if cache_dir is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(target.parent, ".tmp-bpe-")
            tok.save(tmp)
            try:
                os.replace(tmp, target)  # atomic: other processes see all of it or nothing
            except OSError:  # another process got there first with an equivalent result
                shutil.rmtree(tmp, ignore_errors=True)
        return tok
    if kind == "byte":
        tok = ByteTokenizer()
    elif os.path.isdir(kind):
        tok = load_tokenizer(kind)
    else:
        raise ValueError(f"unknown tokenizer {kind!r}: use 'byte', 'bpe', or a directory "
                         "containing tokenizer.json")
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ValueError(f"tokenizer {kind!r} has a fixed vocab_size of {tok.vocab_size}, not "
                         f"{vocab_size}; drop vocab_size or use tokenizer 'bpe'")
    return tok


# -------------------------------------------------------------------------- tokenized corpus

def _docs_hash(docs: Sequence[Document]) -> str:
    h = hashlib.sha1()
    for name, text in docs:
        h.update(hashlib.sha1(name.encode("utf-8")).digest()
                 + hashlib.sha1(text.encode("utf-8")).digest())
    return h.hexdigest()


def tokenize_corpus(docs: Sequence[Document], tokenizer, cache_dir: str | os.PathLike | None = None,
                    chunk: int = 256) -> TokenizedCorpus:
    """Tokenize (bos + ids per document) into `cache_dir`, a directory of this corpus's own, or
    reuse it when its manifest matches these documents and this tokenizer. cache_dir=None: in
    memory only."""
    docs = _check_docs(docs)
    if not docs:
        raise ValueError("no documents to tokenize (is the split empty?)")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    key = {"format": 1, "docs_sha1": _docs_hash(docs), "tokenizer_kind": tokenizer.kind,
           "tokenizer_fingerprint": tokenizer.fingerprint, "bos_id": int(tokenizer.bos_id),
           "vocab_size": int(tokenizer.vocab_size), "dtype": dtype.name, "num_docs": len(docs)}
    d = None if cache_dir is None else Path(cache_dir)
    if d is not None and (d / "manifest.json").is_file():
        try:
            manifest = json.loads((d / "manifest.json").read_text("utf-8"))
            if all(manifest.get(k) == v for k, v in key.items()):
                return _with_counter(TokenizedCorpus.load(d), tokenizer)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or inconsistent cache: rebuild it
    encode_batch = getattr(tokenizer, "encode_batch", None) or (
        lambda texts: [tokenizer.encode(t) for t in texts])
    if isinstance(tokenizer, ByteTokenizer):  # the same ids, at memory speed
        encode_batch = lambda texts: [tokenizer.encode_array(t) for t in texts]  # noqa: E731
    arrays = []
    for start in range(0, len(docs), chunk):
        for ids in encode_batch([doc.text for doc in docs[start:start + chunk]]):
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError("the tokenizer produced ids outside [0, "
                                 f"vocab_size={tokenizer.vocab_size})")
            arrays.append(np.concatenate(([tokenizer.bos_id], ids)).astype(dtype))
    offsets = np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int64)
    tokens, names = np.concatenate(arrays), [doc.name for doc in docs]
    num_bytes = np.array([len(doc.text.encode("utf-8")) for doc in docs], np.int64)
    if d is None:
        return TokenizedCorpus(tokens, offsets, num_bytes, names, bos_id=tokenizer.bos_id,
                               vocab_size=tokenizer.vocab_size,
                               byte_counter=byte_counter(tokenizer))
    # written last, the manifest marks a complete cache
    (d / "manifest.json").unlink(missing_ok=True)
    for name, arr in (("tokens", tokens), ("offsets", offsets), ("num_bytes", num_bytes)):
        write_atomic(d / f"{name}.npy", lambda f, arr=arr: np.save(f, arr))
    write_json(d / "manifest.json", {**key, "total_tokens": len(tokens),
                                      "total_bytes": int(num_bytes.sum()), "names": names})
    return _with_counter(TokenizedCorpus.load(d), tokenizer)


def _with_counter(corpus: TokenizedCorpus, tokenizer) -> TokenizedCorpus:
    corpus.byte_counter = byte_counter(tokenizer)
    return corpus
