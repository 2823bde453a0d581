"""Data: corpora, tokenizers, a memory-mapped token cache, and document lanes for recurrence.

Recurrent state flows from one segment to the next, so a batch row ("lane") reads one document
segment after segment, and `reset` marks where a row starts a new document (state is cleared)."""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from .files import make_temp_dir, write_atomic, write_json

DOC_TOKEN = "<|doc|>"  # document-start token prepended to every document
_CONFIG = "tokenizer_config.json"
_BOS_CANDIDATES = (DOC_TOKEN, "<s>", "<|endoftext|>", "<bos>")
_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class Document(NamedTuple):
    name: str  # stable path-like id: used for sorting, splitting and cache keys
    text: str


# ----------------------------------------------------------------------------------- corpora

def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path} looks binary (it contains NUL bytes); documents must be UTF-8 text: "
                         "remove the file or use a glob pattern that leaves it out")
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
    """Every file under a directory (recursively; hidden entries skipped) or matching a glob pattern
    is one document, named by its posix path relative to the directory (or the pattern's fixed part)."""
    src = os.fspath(pattern_or_dir)
    if os.path.isdir(src):
        base = src
        paths = [p for p in Path(src).rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)]
        if not paths:
            raise ValueError(f"directory {src!r} holds no (non-hidden) files; point at a directory of text files")
    else:
        base = _glob_base(src)
        paths = [Path(p) for p in glob.glob(src, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise ValueError(f"no file matches {src!r}: give an existing directory, file or glob pattern "
                             "(e.g. 'data/**/*.txt')")
    named = sorted((os.path.relpath(p, base).replace(os.sep, "/"), p) for p in paths)
    return (Document(name, _read_text(p)) for name, p in named)


def iter_jsonl(path: str | os.PathLike, text_field: str = "text") -> Iterator[Document]:
    """One JSON object per line with the text in `text_field`; named '<file name>/<line number>'."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"JSONL file {str(path)!r} does not exist")

    def documents():
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if isinstance(text, str):
                        text.encode("utf-8")  # rejects lone surrogates such as "\ud800"
                except (UnicodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}, line {lineno}: not valid UTF-8 JSON text ({e}); fix the line") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}, line {lineno}: expected a JSON object with a string field "
                                     f"{text_field!r}; fix the line or pass text_field= naming the text's field")
                yield Document(f"{path.name}/{lineno:09d}", text)  # zero-padded: sorts in line order

    return documents()


def iter_stdlib() -> Iterator[Document]:
    """The running Python's standard library `.py` files, leaving out test packages and caches."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]  # prune: never descend into them
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    if not found:
        raise ValueError(f"no .py files under the standard library directory {root}; use another corpus")
    return (Document(name, _read_text(p)) for name, p in sorted((p.relative_to(root).as_posix(), p) for p in found))


def load_documents(source: str | os.PathLike, text_field: str = "text") -> list[Document]:
    """'stdlib' (built-in corpus; write './stdlib' for a directory of that name), a `.jsonl` file,
    a directory, or a glob pattern. Empty documents are dropped; the result is sorted by name."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, glob pattern or 'stdlib', not {type(source).__name__}")
    src = os.fspath(source)
    if src == "stdlib":
        docs = iter_stdlib()
    elif src.endswith(".jsonl") and os.path.isfile(src):
        docs = iter_jsonl(src, text_field)
    else:
        docs = iter_text_files(src)
    docs = sorted((d for d in docs if d.text), key=lambda d: d.name)
    if not docs:
        raise ValueError(f"every document from {src!r} is empty; point at a corpus with some text")
    return docs


def _check_docs(docs) -> list[Document]:
    docs = list(docs)
    for d in docs:
        if not (isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], str) and isinstance(d[1], str)):
            raise TypeError(f"documents must be (name, text) pairs of str (see load_documents), got {d!r:.80}")
    return [Document(*d) for d in docs]


def _unit_hash(name: str) -> float:
    """A stable number in [0, 1) per name (the builtin hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: Sequence[Document], val_fraction: float = 0.05,
                    test_fraction: float = 0.05) -> dict[str, list[Document]]:
    """Whole documents go to 'train', 'val' or 'test' by a hash of their name, so adding or removing
    documents never moves the others. With >= 3 documents, every split with a fraction > 0 (train
    always) gets one: an empty split takes the smallest-hash document of the largest split. With
    fewer documents val/test may be empty. Each split keeps the input order."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data; "
                         "keep the sum below 1")
    docs = _check_docs(docs)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, d in enumerate(docs):
        u = _unit_hash(d.name)
        splits["test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"].append(i)
    if len(docs) >= 3:
        for key, frac in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)):
            if frac > 0 and not splits[key]:
                donor = max(splits, key=lambda k: len(splits[k]))  # holds >= 2 documents here
                moved = min(splits[donor], key=lambda i: _unit_hash(docs[i].name))
                splits[donor].remove(moved)
                splits[key].append(moved)
    return {k: [docs[i] for i in sorted(v)] for k, v in splits.items()}


# -------------------------------------------------------------------------------- tokenizers

def _id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors, 0-d ones included
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


class _ByteStream:
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids) -> str:  # an incomplete multi-byte character waits for its remaining bytes
        return self._dec.decode(bytes(i for i in _id_list(ids) if 0 <= i < 256))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class _RedecodeStream:
    """Decodes all ids so far on each feed and emits the new suffix, holding back a trailing U+FFFD
    (a character whose bytes are split over tokens) until more ids arrive or flush()."""

    def __init__(self, tokenizer):
        self._tok, self._ids, self._emitted = tokenizer, [], 0

    def feed(self, ids, final: bool = False) -> str:
        self._ids += _id_list(ids)
        text = self._tok.decode(self._ids)
        text = text if final else text.rstrip("\ufffd")
        new, self._emitted = text[self._emitted:], max(self._emitted, len(text))
        return new

    def flush(self) -> str:
        return self.feed([], final=True)


def _hf_files(directory: Path, bos_token: str, bos_id: int) -> None:
    """What transformers needs to load the tokenizer saved here (AutoTokenizer,
    pipeline): tokenizer_config.json keys for PreTrainedTokenizerFast, merged into ours, and
    generate's bos/eos/pad ids. The document-start token is all three: a model ends a document
    by starting the next, and the padding of our batches is bos. add_bos_token is off, as in
    `encode`; a caller starting a document prepends bos (lm-eval's rolling loglikelihood does)."""
    config = json.loads((directory / _CONFIG).read_text("utf-8"))
    write_json(directory / _CONFIG, {**config, "tokenizer_class": "PreTrainedTokenizerFast",
                                     "bos_token": bos_token, "eos_token": bos_token,
                                     "pad_token": bos_token, "add_bos_token": False,
                                     "split_special_tokens": True})
    write_json(directory / "generation_config.json",
               {"bos_token_id": bos_id, "eos_token_id": bos_id, "pad_token_id": bos_id})


def _byte_level_chars() -> list[str]:
    """The printable character standing for each byte in byte-level BPE (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(moved)) for b in range(256)]


def byte_tokenizer_json() -> dict:
    """ByteTokenizer as a Hugging Face tokenizer.json (written without the tokenizers package):
    byte-level pre-tokenization, one vocabulary entry per byte (id = byte value), no merges,
    and <|doc|> = 256 as a special token."""
    char = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": ByteTokenizer.bos_id, "content": DOC_TOKEN, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "pre_tokenizer": char, "post_processor": None, "decoder": char,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: i for i, c in enumerate(_byte_level_chars())}, "merges": []},
    }


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 is the document-start token."""
    kind, vocab_size, bos_id, fingerprint = "byte", 257, 256, "byte-v1"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in _id_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> _ByteStream:
        return _ByteStream()

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer_config.json, and the same tokenizer as tokenizer.json for transformers."""
        write_json(Path(directory) / _CONFIG, {"kind": self.kind})
        write_json(Path(directory) / "tokenizer.json", byte_tokenizer_json())
        _hf_files(Path(directory), DOC_TOKEN, self.bos_id)


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("BPE and Hugging Face tokenizers need the `tokenizers` package: "
                          "pip install blockrecurrent[bpe]") from None
    return tokenizers


class HFTokenizer:
    """Wraps a `tokenizers.Tokenizer`, e.g. from a local Hugging Face tokenizer.json."""
    kind = "hf"

    def __init__(self, tokenizer, bos_token: str | None = None):
        tokenizer.no_truncation()  # a corpus document must never be cut or padded
        tokenizer.no_padding()
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True  # text is data: a literal "<|doc|>" in it is not bos
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        bos_token = bos_token or next((t for t in _BOS_CANDIDATES if t in vocab), None)
        if bos_token not in vocab:
            raise ValueError(f"the tokenizer has no document-start token (looked for {bos_token or _BOS_CANDIDATES}); "
                             f"add {DOC_TOKEN!r} as a special token or use tokenizer 'bpe' or 'byte'")
        self._tok, self.bos_token, self.bos_id = tokenizer, bos_token, vocab[bos_token]
        self.vocab_size = max(vocab.values()) + 1
        canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True)  # unchanged by save/load
        self.fingerprint = hashlib.sha1(canonical.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:  # parallel in Rust
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(_id_list(ids), skip_special_tokens=True)

    def stream_decoder(self) -> _RedecodeStream:
        return _RedecodeStream(self)

    def save(self, directory: str | os.PathLike) -> None:
        write_atomic(Path(directory) / "tokenizer.json", lambda f: f.write(self._tok.to_str().encode("utf-8")))
        write_json(Path(directory) / _CONFIG, {"kind": self.kind, "bos_token": self.bos_token})
        _hf_files(Path(directory), self.bos_token, self.bos_id)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained on the corpus (`train_bpe`); bos is <|doc|>."""
    kind = "bpe"


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Byte-level, so any text round-trips exactly. A tiny corpus may yield fewer merges than asked."""
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"BPE vocab_size must be an int >= 257 (256 bytes + {DOC_TOKEN}), got {vocab_size!r}")
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(texts, tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[DOC_TOKEN], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    return BPETokenizer(tok, DOC_TOKEN)


def load_tokenizer(directory: str | os.PathLike):
    """Restore a tokenizer saved with `.save()`, or load a plain Hugging Face tokenizer.json directory."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"tokenizer directory {str(d)!r} does not exist")
    config = json.loads((d / _CONFIG).read_text("utf-8")) if (d / _CONFIG).is_file() else None
    if config is None and not (d / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer in {str(d)!r}: expected {_CONFIG} (saved by this library) or tokenizer.json")
    kind = config.get("kind") if config else "hf"
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("bpe", "hf"):
        raise ValueError(f"{d / _CONFIG} names unknown tokenizer kind {kind!r}; expected 'byte', 'bpe' or 'hf'")
    cls = BPETokenizer if kind == "bpe" else HFTokenizer
    return cls(_import_tokenizers().Tokenizer.from_file(str(d / "tokenizer.json")), (config or {}).get("bos_token"))


def make_tokenizer(kind: str | os.PathLike, train_texts=None, vocab_size: int | None = None,
                   cache_dir: str | os.PathLike | None = None):
    """kind 'byte', 'bpe' (trained on train_texts, Documents or str, and cached in cache_dir under a
    hash of their names, contents and vocab_size), or a directory holding a tokenizer."""
    if not isinstance(kind, (str, os.PathLike)):
        raise TypeError(f"tokenizer kind must be 'byte', 'bpe' or a directory path, not {type(kind).__name__}")
    kind = os.fspath(kind)
    if kind == "bpe":
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"tokenizer 'bpe' needs vocab_size, an int >= 257 (e.g. 8192), got {vocab_size!r}")
        if not train_texts:
            raise ValueError("tokenizer 'bpe' needs train_texts (the training documents) to learn merges from")
        _import_tokenizers()  # fail early, before hashing the corpus, if the package is missing
        docs = _check_docs(Document(f"#{i}", t) if isinstance(t, str) else t for i, t in enumerate(train_texts))
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
        raise ValueError(f"unknown tokenizer {kind!r}: use 'byte', 'bpe', or a directory containing tokenizer.json")
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ValueError(f"tokenizer {kind!r} has a fixed vocab_size of {tok.vocab_size}, not {vocab_size}; "
                         "drop vocab_size or use tokenizer 'bpe'")
    return tok


# -------------------------------------------------------------------------- tokenized corpus

def _docs_hash(docs: Sequence[Document]) -> str:
    h = hashlib.sha1()
    for name, text in docs:
        h.update(hashlib.sha1(name.encode("utf-8")).digest() + hashlib.sha1(text.encode("utf-8")).digest())
    return h.hexdigest()


class TokenizedCorpus:
    """All documents' ids, each document starting with bos, in one flat array: document i is
    tokens[offsets[i]:offsets[i + 1]]. num_bytes(i) is its text's UTF-8 size (for bits per byte)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, num_bytes: np.ndarray, names: list[str],
                 *, bos_id: int, vocab_size: int):
        if len(offsets) != len(names) + 1 or len(num_bytes) != len(names) or offsets[-1] != len(tokens):
            raise ValueError("inconsistent corpus arrays (truncated cache?); delete the cache directory to rebuild")
        self.tokens, self.offsets, self._num_bytes, self.names = tokens, offsets, num_bytes, list(names)
        self.bos_id, self.vocab_size = int(bos_id), int(vocab_size)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TokenizedCorpus:
        d = Path(directory)
        manifest = json.loads((d / "manifest.json").read_text("utf-8"))
        return cls(np.load(d / "tokens.npy", mmap_mode="r"), np.load(d / "offsets.npy"), np.load(d / "num_bytes.npy"),
                   manifest["names"], bos_id=manifest["bos_id"], vocab_size=manifest["vocab_size"])

    def __len__(self) -> int:
        return len(self.names)

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"document index {i} out of range for {len(self)} documents")
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def num_bytes(self, i: int) -> int:
        return int(self._num_bytes[i])

    @property
    def doc_lengths(self) -> np.ndarray:  # in tokens, each document's bos included
        return np.diff(self.offsets)

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def total_bytes(self) -> int:
        return int(self._num_bytes.sum())


def tokenize_corpus(docs: Sequence[Document], tokenizer, cache_dir: str | os.PathLike | None = None,
                    chunk: int = 256) -> TokenizedCorpus:
    """Tokenize (bos + ids per document) into `cache_dir`, a directory of this corpus's own, or reuse
    it when its manifest matches these documents and this tokenizer. cache_dir=None: in memory only."""
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
            if all(json.loads((d / "manifest.json").read_text("utf-8")).get(k) == v for k, v in key.items()):
                return TokenizedCorpus.load(d)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or inconsistent cache: rebuild it
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    arrays = []
    for start in range(0, len(docs), chunk):
        for ids in encode_batch([doc.text for doc in docs[start:start + chunk]]):
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(f"the tokenizer produced ids outside [0, vocab_size={tokenizer.vocab_size})")
            arrays.append(np.concatenate(([tokenizer.bos_id], ids)).astype(dtype))
    offsets = np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int64)
    tokens, names = np.concatenate(arrays), [doc.name for doc in docs]
    num_bytes = np.array([len(doc.text.encode("utf-8")) for doc in docs], np.int64)
    if d is None:
        return TokenizedCorpus(tokens, offsets, num_bytes, names, bos_id=tokenizer.bos_id,
                               vocab_size=tokenizer.vocab_size)
    (d / "manifest.json").unlink(missing_ok=True)  # written last, the manifest marks a complete cache
    for name, arr in (("tokens", tokens), ("offsets", offsets), ("num_bytes", num_bytes)):
        write_atomic(d / f"{name}.npy", lambda f, arr=arr: np.save(f, arr))
    write_json(d / "manifest.json", {**key, "total_tokens": len(tokens), "total_bytes": int(num_bytes.sum()),
                                      "names": names})
    return TokenizedCorpus.load(d)


# ---------------------------------------------------------------------------- document lanes

class DocumentLanes:
    """Batches for recurrence: row k of each batch continues the document it read in the last one.

    Global lane j of G = batch_size * world_size reads the documents whose index i % G == j, in an
    order reshuffled each epoch from (seed, j, epoch). Rank r owns lanes r*batch_size ... so the rows
    of a run do not depend on how its lanes are spread over ranks."""

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
        empty = int((np.bincount(usable % G, minlength=G) == 0).sum())
        if empty:
            raise ValueError(f"{empty} of the {G} lanes (batch_size {batch_size} x world_size {world_size}) get no "
                             f"document: lane j reads the documents with index % {G} == j and the corpus has "
                             f"{len(usable)} non-empty ones; lower batch_size or world_size")
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
                rng = np.random.default_rng([self.seed, self.rank * self.batch_size + k, self._epoch[k]])
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
        positions, reset, doc_index = np.full((b, T), -1, np.int64), np.ones(b, bool), np.full(b, -1, np.int64)
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
        arrays = dict(inputs=inputs, targets=targets, loss_mask=mask, reset=reset, positions=positions,
                      doc_index=doc_index)
        return {key: torch.from_numpy(v) for key, v in arrays.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.loop or not self.exhausted:
            yield self.next_batch()

    def _config(self) -> dict:
        return {"batch_size": self.batch_size, "segment_len": self.segment_len, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle, "loop": self.loop,
                "num_docs": len(self.corpus), "total_tokens": int(self.corpus.total_tokens)}

    def state_dict(self) -> dict:
        """Plain ints and lists (JSON-serialisable), covering this rank's lanes only."""
        return {"format": 1, "config": self._config(), "epoch": list(self._epoch), "pos": list(self._pos),
                "offset": list(self._offset), "seen_targets": self._seen, "padded_targets": self._padded,
                "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError("not a DocumentLanes state_dict (no 'format': 1)")
        saved = state.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in self._config().items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"lanes state was saved with other settings ({{name: (saved, current)}}: {diff}); "
                             "build DocumentLanes with the saved settings and corpus to resume")
        lanes = [[int(x) for x in state[k]] for k in ("epoch", "pos", "offset")]
        if any(len(v) != self.batch_size for v in lanes):
            raise ValueError(f"state_dict lane lists must have batch_size = {self.batch_size} entries")
        self._epoch, self._pos, self._offset = lanes
        self._seen, self._padded, self._batches = (int(state[k]) for k in ("seen_targets", "padded_targets", "batches"))
